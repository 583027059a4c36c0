"""The package around the kernels: backend selection, import without the extension, `python -m seqkern.info`."""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import seqkern
import seqkern.info
from seqkern import _extension, backends
from seqkern.backends import resolve

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env))


def test_import_without_the_cpp_kernels_falls_back_to_reference_and_says_so_once_per_op():
    result = _run(
        "import torch, seqkern\n"
        "m = seqkern.nn.LSTM(3, 4)\n"
        "print(m(torch.randn(2, 1, 3))[0].shape, m(torch.randn(2, 1, 3))[0].shape)\n"
        "print(seqkern.backends.resolve('lstm', torch.device('cpu'), torch.float32, seqkern.ops.lstm.SUPPORTED_DTYPES))\n",
        SEQKERN_NO_EXT="1",
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 1, 4]) torch.Size([2, 1, 4])" in result.stdout and "reference" in result.stdout
    assert result.stderr.count("seqkern: lstm runs its pure-PyTorch reference: the C++ kernels are not loaded "
                               "(disabled by SEQKERN_NO_EXT=1)") == 1, result.stderr


def test_a_failed_build_warns_once_runs_the_references_and_is_not_retried(tmp_path):
    """A compiler that fails (CXX=false): import still works, says why and how to retry; the next import does
    not compile again (the failure is remembered for these sources)."""
    code = "import torch, seqkern\nprint(seqkern.nn.GRU(3, 4)(torch.randn(2, 1, 3))[0].shape)\n"
    env = dict(SEQKERN_CACHE=str(tmp_path), CXX="false", SEQKERN_CPU_CAPABILITY="default")
    first, second = _run(code, **env), _run(code, **env)
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        assert "torch.Size([2, 1, 4])" in result.stdout
        assert result.stderr.count("the C++ kernels are not available") == 1, result.stderr
        assert "python -m seqkern.build --retry" in result.stderr and "build.log" in result.stderr, result.stderr
    announcement = "seqkern: building the C++ kernels for default (once"
    assert announcement in first.stderr and announcement not in second.stderr, second.stderr


def test_concurrent_first_uses_build_once(tmp_path, monkeypatch):
    """Two threads (separate lock handles, as two processes) ask for an unbuilt level: one compiles, the other
    waits and loads its result. A failed build is remembered until --retry."""
    monkeypatch.setenv("SEQKERN_CACHE", str(tmp_path))
    compiled = []

    def fake_compile(level, directory):
        compiled.append(level)
        time.sleep(0.5)
        (directory / f"{_extension.library_name(level)}.fake.so").write_bytes(b"")

    monkeypatch.setattr(_extension, "_compile", fake_compile)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: _extension.build("avx2", announce=False), range(2)))
    assert compiled == ["avx2"] and paths[0] == paths[1] and paths[0].parent == _extension.build_dir("avx2")

    def failing_compile(level, directory):
        compiled.append(level)
        raise _extension.BuildError("compiler says no")

    monkeypatch.setattr(_extension, "_compile", failing_compile)
    for _ in range(2):
        with pytest.raises(_extension.BuildError, match="compiler says no"):
            _extension.build("default", announce=False)
    assert compiled == ["avx2", "default"]
    monkeypatch.setattr(_extension, "_compile", fake_compile)
    assert _extension.build("default", retry=True, announce=False).name.startswith("seqkern_cpu_default.")


def _source_tree(destination: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) copied to `destination`: pip builds in the tree."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_pip_wheel_with_build_isolation_is_pure_python_and_never_fetches_torch(tmp_path):
    """`pip wheel .` as a user runs it (default build isolation): setuptools alone builds it, no torch enters
    the build environment, and the wheel carries the C++ sources and the Triton kernels, no binary."""
    tree = _source_tree(tmp_path / "src")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), "."],
                            cwd=tree, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch" not in result.stdout.lower().replace("seqkern", ""), result.stdout
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"seqkern-{seqkern.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("seqkern/csrc/cpu/lstm.cpp", "seqkern/csrc/cpu/cpu_features.h", "seqkern/kernels/lstm.py",
                     "seqkern/ops/_schemas.py", "seqkern/_extension.py", "seqkern/build.py"):
        assert expected in names, sorted(names)
    assert not [n for n in names if n.endswith((".so", ".pyd"))]


def test_triton_serves_float16_without_the_cpp_kernels():
    """The schemas, fakes and autograd are Python's: with no C++ library loaded the Triton kernels still run
    (here under the interpreter), in float16 too, under the rule against torch's own float16 and float64."""
    code = f"""
import copy, sys
import torch, torch.nn.functional as F
import seqkern
sys.path.insert(0, {str(ROOT / "tests")!r})
from helpers import assert_rule
assert not seqkern.backends.cpu_kernel_available()
torch.manual_seed(0)
theirs = torch.nn.LSTM(6, 8).double()
ours = seqkern.nn.LSTM(6, 8)
ours.load_state_dict(theirs.state_dict())
ours.half()
x = torch.randn(5, 3, 6, dtype=torch.float64) * 2
ref, (ref_h, ref_c) = theirs(x)
half, (half_h, half_c) = copy.deepcopy(theirs).half()(x.half())
with seqkern.backend("triton"):
    out, (h, c) = ours(x.half())
assert_rule("lstm output", out, half, ref)
assert_rule("lstm h_n", h, half_h, ref_h)
assert_rule("lstm c_n", c, half_c, ref_c)
q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) * 3 for n in (7, 9, 9))
for causal in (False, True):
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    half = F.scaled_dot_product_attention(q.half(), k.half(), v.half(), is_causal=causal)
    with seqkern.backend("triton"):
        out = seqkern.attention(q.half(), k.half(), v.half(), is_causal=causal)
    assert_rule(f"attention causal={{causal}}", out, half, ref)
print("ok")
"""
    result = _run(code, SEQKERN_NO_EXT="1")
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr[-3000:]


def test_float16_on_cuda_runs_triton_for_every_op():
    """"auto" picks the Triton kernel for float16 CUDA tensors of every op (no reference fallback)."""
    for op, (dtypes, kernel) in seqkern.info.OPS.items():
        assert resolve(op, torch.device("cuda"), torch.float16, dtypes, kernel=kernel) == "triton", op


def test_info_reports_backends():
    result = subprocess.run([sys.executable, "-m", "seqkern.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cpu        available" in result.stdout
    assert f"\ncpu capability: {_extension.CAPABILITY} " in result.stdout, result.stdout
    table = result.stdout.split("\nop ", 1)[1].splitlines()[1:]
    rows = {line.split()[0]: line.split()[1] for line in table if line.strip()}
    for op in ("lstm", "gru", "rnn", "flash_attention", "flash_attention_decode", "additive_attention"):
        assert rows.get(op) == "cpu", result.stdout


def test_backend_context_and_environment(monkeypatch):
    assert seqkern.current_backend() == "auto"
    with seqkern.backend("reference"):
        assert seqkern.current_backend() == "reference"
        with seqkern.backend("cpu"):
            assert seqkern.current_backend() == "cpu"
        assert seqkern.current_backend() == "reference"
    monkeypatch.setenv("SEQKERN_BACKEND", "triton")
    assert seqkern.current_backend() == "triton"
    monkeypatch.setenv("SEQKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"\$SEQKERN_BACKEND: expected one of .* got 'fast'"):
        seqkern.current_backend()
    with pytest.raises(ValueError, match=r"seqkern.backend\(name\): expected one of"):
        with seqkern.backend("gpu"):
            pass


def test_backend_resolution():
    from seqkern.backends import resolve
    from seqkern.ops.lstm import SUPPORTED_DTYPES as dtypes

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert resolve("lstm", cpu, torch.float32, dtypes) == "cpu"
    assert resolve("lstm", cpu, torch.float16, dtypes) == "reference"  # auto falls back for a dtype no kernel has
    assert resolve("lstm", meta, torch.float32, dtypes) == "reference"
    with seqkern.backend("cpu"), pytest.raises(TypeError, match="float16"):
        resolve("lstm", cpu, torch.float16, dtypes)
    with seqkern.backend("cpu"), pytest.raises(ValueError, match="meta"):
        resolve("lstm", meta, torch.float32, dtypes)


def test_float16_falls_back_to_reference_and_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    module = seqkern.nn.LSTM(3, 4).half()
    with pytest.warns(RuntimeWarning, match="seqkern: lstm runs its pure-PyTorch reference: its cpu kernel does "
                                            "not serve torch.float16"):
        out, _ = module(torch.randn(2, 1, 3).half())
    assert out.dtype == torch.float16
