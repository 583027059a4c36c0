"""Loads seqkern._C (the C++ CPU kernels and every op schema) if it was built.

Without it `import seqkern` still works: every op then runs its pure-PyTorch reference, and one
warning says so, with the command that builds the extension.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch, which seqkern._C links against)

try:
    from seqkern import _C  # noqa: F401  (importing registers torch.ops.seqkern.*)

    AVAILABLE = True
    IMPORT_ERROR: str | None = None
except ImportError as error:  # pragma: no cover - exercised by the no-extension test in a subprocess
    AVAILABLE = False
    IMPORT_ERROR = str(error)
    warnings.warn(
        "seqkern: the C++ extension seqkern._C is not available "
        f"({IMPORT_ERROR}); every op falls back to its pure-PyTorch reference. "
        "Build it with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )
