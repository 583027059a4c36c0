"""`make bench` keeps working: the benchmark entry point runs its quick set end to end (tiny shapes, every
contender, table, JSON and PNG). Timings are not judged here; see benchmarks/."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("op", ["lstm", "attention", "transformer", "seq2seq"])
def test_quick_benchmark_run(tmp_path, op):
    # A subprocess, so torch.compile settings the harness makes do not leak into the test session.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", op, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary, "empty summary"
    assert (tmp_path / "ratios.png").stat().st_size > 0
    assert "seqkern" in result.stdout
