"""Triton kernels for CUDA tensors. Imported lazily (by metakernels/_backend.py) so `import metakernels`
does not need triton. Tested on the CPU through TRITON_INTERPRET=1 with METAKERNELS_TRITON_ON_CPU=1 (or
metakernels._backend.set_cpu_backend("triton")), which registers these launchers as the CPU kernels.
The interpreter ignores strides, so every launcher passes contiguous tensors.
"""
