"""The comparison examples run end to end in their smoke configuration (--quick) and write their plots; their
full runs and figures are in README's "Examples" section."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = {
    "seq2seq_attention_vs_context.py": ("--out", "--heatmap"),
    "bert_pretrain_finetune.py": ("--out",),
    "rnn_vs_transformer.py": ("--out",),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs_and_writes_its_plots(tmp_path, script):
    outputs = [tmp_path / f"{flag.strip('-')}.png" for flag in EXAMPLES[script]]
    arguments = [str(value) for flag, path in zip(EXAMPLES[script], outputs) for value in (flag, path)]
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", *arguments],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in outputs:
        assert path.stat().st_size > 10_000, f"{path.name} is missing or empty"
    assert "wrote" in result.stdout
