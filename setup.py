"""Build of metakernels: the Python package plus the C++ CPU extension metakernels._C.

The extension is compiled against the installed torch (pin torch==2.13.0 and install with
`pip install --no-build-isolation -e .`, so the build sees that torch rather than fetching another).
Set METAKERNELS_BUILD_EXTENSION=0 to install the pure-Python package only (the reference kernels then
serve every op), and METAKERNELS_NATIVE_ARCH=0 to compile for the baseline x86-64 ISA instead of this CPU.
"""

import glob
import os

from setuptools import find_packages, setup


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("METAKERNELS_BUILD_EXTENSION", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -fno-trapping-math: nothing here reads the floating-point exception flags, and without it GCC may not
    # if-convert a loop whose select arms do arithmetic (it must not speculate an operation that could raise):
    # without AVX-512 masking, the conv block's pooled backward then ran scalar, 4-6x slower. Results are
    # unchanged (no reassociation, NaN/inf semantics kept: that would be -ffast-math).
    flags = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-std=c++17", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("METAKERNELS_NATIVE_ARCH", "1") != "0":
        # The extension is always built on the machine that runs it (an editable install from source),
        # so it may use that CPU's vector units (AVX2/AVX-512 here).
        flags.append("-march=native")
    sources = ["csrc/extension.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    ext = CppExtension(
        name="metakernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc"), os.path.abspath("csrc/kernels")],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["metakernels", "metakernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
