"""CPU capability levels: which level loads, forcing a lower one, and the core op tests at every level this
machine runs (each level is its own library: the AVX2 and baseline code paths are compiled and tested here too)."""
import os
import subprocess
import sys

import pytest

import seqkern
from seqkern import _extension

TESTS = os.path.dirname(os.path.abspath(__file__))
# The CPU kernels of the core ops (sequence and cell) against their oracles in float32 and float64. bfloat16 is
# left out: its arithmetic is the float32 code path's (only the loads and stores convert, the same at every
# level). All dtypes took 92 s of CPU per level (148 tests, measured at avx2 on a loaded machine).
CORE_TESTS = ["test_lstm.py", "test_gru.py", "test_rnn.py", "test_flash_attention.py"]
CORE_SELECTION = "(cpu_kernel_against or cpu_cell_kernel_against) and not bfloat16"


def test_the_loaded_level_is_the_cpus_or_the_forced_one():
    expected = os.environ.get(_extension.CAPABILITY_VAR) or _extension.cpu_capability()
    assert seqkern.backends.cpu_kernel_available(), _extension.IMPORT_ERROR
    assert _extension.CAPABILITY == expected
    assert _extension.LIBRARY.name.startswith(f"seqkern_cpu_{expected}.")


def test_forcing_a_level(monkeypatch):
    monkeypatch.setattr(_extension, "cpu_capability", lambda: "avx2")
    monkeypatch.delenv(_extension.CAPABILITY_VAR, raising=False)
    assert _extension.requested_capability() == "avx2"
    monkeypatch.setenv(_extension.CAPABILITY_VAR, "default")
    assert _extension.requested_capability() == "default"
    monkeypatch.setenv(_extension.CAPABILITY_VAR, "AVX512")
    with pytest.raises(RuntimeError, match=r"SEQKERN_CPU_CAPABILITY=avx512: this CPU .* runs at most the 'avx2'"):
        _extension.requested_capability()
    monkeypatch.setenv(_extension.CAPABILITY_VAR, "sse9")
    with pytest.raises(ValueError, match=r"expected one of \('default', 'avx2', 'avx512'\), got 'sse9'"):
        _extension.requested_capability()


def test_no_level_depends_on_the_build_machine_or_enables_bf16_amx_globally():
    for level in _extension.LEVELS:
        flags = " ".join(_extension.compile_flags(level))
        assert "native" not in flags and "bf16" not in flags and "amx" not in flags and "fp16" not in flags, flags
    assert "-march=x86-64-v4" in _extension.compile_flags("avx512")
    assert "-march=x86-64-v3" in _extension.compile_flags("avx2")
    assert not any(flag.startswith("-march") for flag in _extension.compile_flags("default"))


def test_info_names_the_level():
    env = dict(os.environ, **{_extension.CAPABILITY_VAR: "default"})
    result = subprocess.run([sys.executable, "-m", "seqkern.info"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\ncpu capability: default " in result.stdout, result.stdout


def _levels_below_this_cpu():
    best = _extension.cpu_capability()
    return [level for level in _extension.LEVELS[:_extension.LEVELS.index(best)]]


@pytest.mark.slow
@pytest.mark.parametrize("level", _levels_below_this_cpu())
def test_core_ops_at_a_lower_level(level):
    """The core ops' CPU kernel tests, in a process that loads the `level` library (built by `make install`'s
    `python -m seqkern.build --runnable`; built here on first use otherwise)."""
    code = ("import sys, pytest, seqkern\n"
            f"assert seqkern._extension.CAPABILITY == {level!r}, seqkern._extension.IMPORT_ERROR\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', {CORE_SELECTION!r}, *{CORE_TESTS!r}]))\n")
    env = dict(os.environ, **{_extension.CAPABILITY_VAR: level})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=TESTS,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]
