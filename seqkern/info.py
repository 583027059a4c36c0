"""`python -m seqkern.info`: versions, the backends this machine has, and which implementation each
op runs for CPU and CUDA tensors (under the backend in force: SEQKERN_BACKEND or "auto")."""
from __future__ import annotations

import os
import platform

import torch

import seqkern
from seqkern import _extension, _triton, backends
from seqkern.ops import additive_attention, flash_attention, gru, lstm, rnn

# op name -> its dtype table; every op module adds its line here.
# op -> (dtypes per implementation, the torch.ops.seqkern entry whose presence in the build decides "auto")
OPS = {
    "lstm": (lstm.SUPPORTED_DTYPES, "lstm_forward"),
    "gru": (gru.SUPPORTED_DTYPES, "gru_forward"),
    "rnn": (rnn.SUPPORTED_DTYPES, "rnn_forward"),
    "flash_attention": (flash_attention.SUPPORTED_DTYPES, "flash_attention_forward"),
    "flash_attention_decode": (flash_attention.SUPPORTED_DTYPES, "flash_attention_decode"),
    "additive_attention": (additive_attention.SUPPORTED_DTYPES, "additive_attention_forward"),
}


def _triton_version() -> str:
    if not _triton.available():
        return "not installed"
    import triton

    return triton.__version__


def cpu_model() -> str:
    """The CPU's model name (benchmarks record it too)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capability_line() -> str:
    """`cpu capability: <level in use>`, then why that level and where its library is."""
    best = _extension.cpu_capability()
    forced = os.environ.get(_extension.CAPABILITY_VAR)
    why = f"forced by ${_extension.CAPABILITY_VAR}; this CPU runs {best}" if forced else "this CPU's level"
    if _extension.AVAILABLE:
        return f"cpu capability: {_extension.CAPABILITY}   ({why}; {_extension.LIBRARY})"
    return f"cpu capability: none   (C++ kernels not loaded; this CPU runs {best})"


def _choice(op: str, device: str, dtypes, kernel: str) -> str:
    try:
        return backends.resolve(op, torch.device(device), torch.float32, dtypes, kernel=kernel, warn=False)
    except (RuntimeError, ValueError, TypeError) as error:
        return f"unavailable ({error})"


def report() -> str:
    cuda = torch.cuda.is_available()
    lines = [
        f"seqkern {seqkern.__version__}   torch {torch.__version__}   triton {_triton_version()}   "
        f"python {platform.python_version()}",
        f"threads: {torch.get_num_threads()}   CPU: {cpu_model()}",
        capability_line(),
        "backends:",
        "  reference  available (pure PyTorch)",
        f"  cpu        {'available' if _extension.AVAILABLE else 'missing: ' + str(_extension.IMPORT_ERROR)}",
        f"  triton     {'available' if backends.triton_available() else 'missing'}"
        f"{'' if cuda else ' (no CUDA device: runs only when forced, under the Triton interpreter)'}",
        f"backend in force: {backends.current()}",
        f"{'op':<23} float32 on CPU      float32 on CUDA",
    ]
    for op, (dtypes, kernel) in OPS.items():
        lines.append(f"{op:<23} {_choice(op, 'cpu', dtypes, kernel):<19} {_choice(op, 'cuda', dtypes, kernel)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
