"""Whether Triton is importable, without importing it at `import seqkern` time."""
from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True if the `triton` package is installed (its kernels run on CUDA, or on CPU under the interpreter)."""
    return importlib.util.find_spec("triton") is not None
