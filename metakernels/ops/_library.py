"""The `metakernels` op namespace. Every op's schema is defined once, here through this Library, by
its module in metakernels/ops; kernels are attached per backend by metakernels/_backend.py."""

import torch

LIBRARY = torch.library.Library("metakernels", "DEF")
