"""seqkern.nn.PositionalEncoding: the sinusoids of "Attention Is All You Need" added to the input, dropout,
layouts, a buffer kept out of state_dict, and errors."""
from __future__ import annotations

import math

import pytest
import torch

import seqkern
from seqkern.nn.positional_encoding import sinusoidal_table


@pytest.mark.parametrize("d_model", [1, 6, 7])
def test_table_is_the_paper_formula(d_model):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)), odd d_model included."""
    table = sinusoidal_table(50, d_model, torch.float64)
    for pos in (0, 1, 17, 49):
        for feature in range(d_model):
            angle = pos / 10000 ** (2 * (feature // 2) / d_model)
            expected = math.sin(angle) if feature % 2 == 0 else math.cos(angle)
            assert table[pos, feature].item() == pytest.approx(expected, abs=1e-12), (pos, feature)


@pytest.mark.parametrize("batch_first, shape", [(False, (5, 3, 8)), (True, (3, 5, 8)), (False, (5, 8)),
                                                (True, (5, 8))])
def test_adds_the_table_along_the_sequence(batch_first, shape):
    module = seqkern.nn.PositionalEncoding(8, dropout=0.0, max_len=20, batch_first=batch_first)
    x = torch.randn(shape)
    table = sinusoidal_table(5, 8)
    expected = x + (table.unsqueeze(0) if batch_first and len(shape) == 3 else
                    table.unsqueeze(1) if len(shape) == 3 else table)
    torch.testing.assert_close(module(x), expected)


def test_dropout_in_training_only():
    module = seqkern.nn.PositionalEncoding(16, dropout=0.5)
    x = torch.randn(10, 2, 16)
    dropped = module(x)
    assert (dropped == 0).any()
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], (2 * (x + module.pe[:10].unsqueeze(1)))[kept])
    module.eval()
    torch.testing.assert_close(module(x), x + module.pe[:10].unsqueeze(1))


def test_buffer_is_not_in_state_dict_and_follows_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), seqkern.nn.PositionalEncoding(4, max_len=12))
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    model.double()
    assert model[1].pe.dtype == torch.float64 and model[1].pe.shape == (12, 4)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    model.eval()
    (grad,) = torch.autograd.grad(model[1](x).sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x))


BAD = [
    ("too long", lambda m: m(torch.randn(9, 2, 4)), ValueError, "max_len=8"),
    ("too long batch_first", lambda m: seqkern.nn.PositionalEncoding(4, max_len=8, batch_first=True)(
        torch.randn(2, 9, 4)), ValueError, "sequence length 9"),
    ("width", lambda m: m(torch.randn(3, 2, 5)), ValueError, "x: expected"),
    ("4-D", lambda m: m(torch.randn(3, 2, 1, 4)), ValueError, "x: expected"),
    ("integer", lambda m: m(torch.zeros(3, 2, 4, dtype=torch.int64)), TypeError, "floating-point"),
    ("not a tensor", lambda m: m([[0.0] * 4]), TypeError, "torch.Tensor"),
    ("d_model", lambda m: seqkern.nn.PositionalEncoding(0), ValueError, "d_model"),
    ("dropout", lambda m: seqkern.nn.PositionalEncoding(4, dropout=1.5), ValueError, "dropout"),
]


@pytest.mark.parametrize("name, call, error, words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call(seqkern.nn.PositionalEncoding(4, max_len=8))
