"""seqkern.models.BertEncoder: outputs and gradients against the same encoder on torch.nn's layers (the rule of
DESIGN.md, torch.nn's layers in float64 as the oracle), the padding mask, segments, state_dict, bad input."""
import copy

import pytest
import torch
from helpers import assert_all_rule

from seqkern.models import BertEncoder

CONFIG = dict(vocab_size=53, d_model=48, nhead=4, num_layers=2, dim_feedforward=96, max_len=32, dropout=0.0)


def build(layer_cls=None, **overrides) -> BertEncoder:
    torch.manual_seed(0)
    return BertEncoder(**{**CONFIG, **overrides}, layer_cls=layer_cls)


def tokens(*shape: int, high: int = CONFIG["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths: list[int], length: int) -> torch.Tensor:
    """(B, length) int64: 1 on each sequence's first lengths[b] tokens, 0 on its padding."""
    return (torch.arange(length) < torch.tensor(lengths)[:, None]).long()


def outputs_and_grads(model, input_ids, mask, segments, cotangents) -> dict:
    sequence, pooled = model(input_ids, mask, segments)
    keep = mask.bool()[..., None]  # padded rows are unspecified: left out of the comparison and the loss
    model.zero_grad()
    ((sequence.double() * cotangents[0] * keep).sum() + (pooled.double() * cotangents[1]).sum()).backward()
    results = {"sequence_output": sequence * keep, "pooled_output": pooled}
    results.update({f"grad_{name}": p.grad for name, p in model.named_parameters()})
    return results


def test_outputs_and_gradients_follow_the_rule():
    ours = build()
    theirs = build(layer_cls=torch.nn.TransformerEncoderLayer)
    theirs.load_state_dict(ours.state_dict())
    oracle = copy.deepcopy(theirs).double()  # the same encoder on torch.nn's layers, in float64
    input_ids, segments = tokens(3, 11), tokens(3, 11, high=2, seed=2)
    mask = lengths_mask([11, 7, 1], 11)
    gen = torch.Generator().manual_seed(3)
    cotangents = (torch.randn(3, 11, 48, generator=gen, dtype=torch.float64),
                  torch.randn(3, 48, generator=gen, dtype=torch.float64))
    expected = outputs_and_grads(oracle, input_ids, mask, segments, cotangents)
    assert_all_rule(outputs_and_grads(ours, input_ids, mask, segments, cotangents),
                    outputs_and_grads(theirs, input_ids, mask, segments, cotangents), expected)


@pytest.mark.parametrize("training", [False, True])
def test_padding_does_not_change_the_real_tokens(training):
    model = build().train(training)
    input_ids, segments = tokens(2, 6), tokens(2, 6, high=2, seed=2)
    alone, alone_pooled = model(input_ids, None, segments)
    padded_ids = torch.cat([input_ids, tokens(2, 5, seed=4)], dim=1)
    padded_segments = torch.cat([segments, torch.ones(2, 5, dtype=torch.long)], dim=1)
    padded, padded_pooled = model(padded_ids, lengths_mask([6, 6], 11), padded_segments)
    torch.testing.assert_close(padded[:, :6], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded_pooled, alone_pooled, rtol=0, atol=1e-5)
    # Without the mask the extra tokens do take part.
    assert not torch.allclose(model(padded_ids, None, padded_segments)[0][:, :6], alone, atol=1e-3)


def test_segments_and_defaults():
    model = build().eval()
    input_ids = tokens(2, 8)
    zeros = torch.zeros_like(input_ids)
    torch.testing.assert_close(model(input_ids), model(input_ids, torch.ones_like(input_ids), zeros))
    assert not torch.allclose(model(input_ids)[0], model(input_ids, None, torch.ones_like(input_ids))[0])
    sequence, pooled = model(input_ids, torch.ones(2, 8, dtype=torch.bool))
    assert sequence.shape == (2, 8, 48) and pooled.shape == (2, 48)
    assert pooled.abs().max() <= 1  # tanh


def test_state_dict_round_trip_with_torch_layers():
    ours = build().eval()
    theirs = BertEncoder(**CONFIG, layer_cls=torch.nn.TransformerEncoderLayer).eval()
    theirs.load_state_dict(ours.state_dict())
    input_ids, mask = tokens(2, 9), lengths_mask([9, 4], 9)
    for got, want in zip(theirs(input_ids, mask), ours(input_ids, mask)):
        torch.testing.assert_close(got[:1], want[:1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, error, match", [
    ((tokens(2, 5).float(),), TypeError, "input_ids: expected an int64"),
    ((tokens(2, 33),), ValueError, "max_len=32"),
    ((tokens(2, 5), torch.ones(2, 4)), ValueError, "attention_mask: expected a tensor of shape"),
    ((tokens(2, 5), torch.ones(2, 5)), ValueError, "attention_mask: expected 1 .* got torch.float32"),
    ((tokens(2, 5), None, tokens(2, 5, high=3)), ValueError, r"token_type_ids: expected ids in \[0, 2\)"),
    ((tokens(2, 5), None, tokens(2, 4, high=2)), ValueError, "token_type_ids: expected shape"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        build()(*args)
