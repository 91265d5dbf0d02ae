"""`python -m metakernels ...`: the same command line as the `metakernels` console script."""

import sys

from .cli import main

sys.exit(main())
