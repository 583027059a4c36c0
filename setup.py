"""seqkern installs as pure Python: no compiler, and no torch, at install time.

The C++ CPU kernels (csrc/) ship as package data (seqkern/csrc) and are built on first use, against the torch
the user has, for the CPU capability level the machine runs (seqkern/_extension.py; `python -m seqkern.build`
builds ahead). So a plain `pip install .` / `pip wheel .` works with pip's default build isolation and never
downloads or replaces torch. The Triton kernels (kernels/) are installed as seqkern.kernels.
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["seqkern", "seqkern.*"]) + ["seqkern.kernels", "seqkern.csrc", "seqkern.csrc.cpu"]

setup(
    packages=PACKAGES,
    package_dir={"seqkern.kernels": "kernels", "seqkern.csrc": "csrc"},
    package_data={"seqkern.csrc": ["*.cpp", "*.h"], "seqkern.csrc.cpu": ["*.cpp", "*.h"]},
)
