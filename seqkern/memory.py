"""The C++ recurrent layers' workspace cache (csrc/cpu/workspace_pool.h): their large tensors (temporaries,
outputs, saved workspaces, grad_input) come from blocks kept across calls, so that a training loop does not
fault in fresh pages on every call. A block is idle once no tensor uses it; idle blocks stay resident up to a
cap until `empty_cache()` frees them, as `torch.cuda.empty_cache()` does for CUDA's caching allocator.

    seqkern.empty_cache()            # frees every idle block; returns the bytes freed
    seqkern.memory.cached_bytes()    # idle bytes held now

$SEQKERN_WORKSPACE_CACHE_MB (read once, at import; default 128) caps the idle bytes; 0 turns the cache off, and
every tensor then comes from c10's CPU allocator. Without the C++ kernels there is no cache (every function
returns 0).

The library's C entry points are called through ctypes, not as ops: nothing here reaches the dispatcher or
torch.compile.
"""
from __future__ import annotations

import ctypes
import functools
import os

from seqkern import _extension

CACHE_VAR = "SEQKERN_WORKSPACE_CACHE_MB"
DEFAULT_CACHE_MB = 128


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded C++ library (dlopen of the same path returns torch.ops.load_library's handle), or None."""
    if not _extension.AVAILABLE:
        return None
    library = ctypes.CDLL(str(_extension.LIBRARY))
    for name in ("seqkern_workspace_cached_bytes", "seqkern_workspace_empty_cache",
                 "seqkern_workspace_max_cached_bytes"):
        getattr(library, name).restype = ctypes.c_size_t
    library.seqkern_workspace_set_max_cached_bytes.argtypes = [ctypes.c_size_t]
    library.seqkern_workspace_set_max_cached_bytes.restype = None
    return library


def _call(name: str, *args) -> int:
    library = _library()
    return 0 if library is None else getattr(library, name)(*args)


def empty_cache() -> int:
    """Frees every idle block of the workspace cache and returns the bytes freed. Tensors in use are untouched
    (their blocks come back to the cache when they die)."""
    return _call("seqkern_workspace_empty_cache")


def cached_bytes() -> int:
    """Idle bytes the workspace cache holds now."""
    return _call("seqkern_workspace_cached_bytes")


def max_cached_bytes() -> int:
    """The cap on idle bytes ($SEQKERN_WORKSPACE_CACHE_MB); 0: the cache is off."""
    return _call("seqkern_workspace_max_cached_bytes")


def cache_limit_from_environment() -> int:
    """$SEQKERN_WORKSPACE_CACHE_MB in bytes (default 128 MB); a value that is not a whole number >= 0 raises."""
    value = os.environ.get(CACHE_VAR, "").strip()
    if not value:
        return DEFAULT_CACHE_MB << 20
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"${CACHE_VAR}: expected a whole number of megabytes >= 0 (0 turns the workspace cache "
                         f"off), got {value!r}")
    return min(int(value) << 20, 2**64 - 1)  # size_t; any value that large means "no cap"


def configure() -> None:
    """Sets the cache's cap from the environment (import seqkern calls it once, after loading the library)."""
    limit = cache_limit_from_environment()
    library = _library()
    if library is not None:
        library.seqkern_workspace_set_max_cached_bytes(limit)
