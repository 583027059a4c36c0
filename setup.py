"""Builds seqkern._C, the C++ CPU kernels, against the torch already installed.

Install torch first, then `pip install --no-build-isolation -e .`: with build isolation pip would
fetch a fresh (CUDA, multi-GB) torch into the build environment and build against that instead.

Environment:
  SEQKERN_MARCH   value for -march (default "native"; the kernels are built on the machine that runs
                  them). Set e.g. "x86-64-v3" when building a wheel for other machines.
  SEQKERN_NO_EXT  set to 1 to skip the extension (the package then runs its reference code).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["seqkern", "seqkern.*"]) + ["seqkern.kernels"]


def extensions():
    if os.environ.get("SEQKERN_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    march = os.environ.get("SEQKERN_MARCH", "native")
    cxx_flags = ["-O3", "-std=c++17", f"-march={march}", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
    ext_kwargs = dict(
        name="seqkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda_sources and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None:
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            **{k: v for k, v in ext_kwargs.items() if k != "sources"},
        )
    else:
        ext = cpp_extension.CppExtension(**ext_kwargs)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = extensions()
setup(
    packages=PACKAGES,
    package_dir={"seqkern.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
