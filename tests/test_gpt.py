"""seqkern.models.GPT: the forward and its gradients against the same model on torch.nn's layers (the rule of
DESIGN.md), KV-cache generation against recomputing the sequence, sampling, tied weights, bad input."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_all_rule, assert_rule

import seqkern
from seqkern.models import GPT, KVCache

TORCH_LAYER = torch.nn.TransformerEncoderLayer
CONFIG = dict(vocab_size=37, d_model=48, nhead=4, num_layers=2, dim_feedforward=96, max_len=40)


def build(dtype=torch.float32, layer_cls=None, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(**{**CONFIG, **overrides}, layer_cls=layer_cls).to(dtype)


def twins(**overrides) -> tuple[GPT, GPT, GPT]:
    """seqkern's model (float32), the one on torch.nn's layers with the same weights (float32), and that one in
    float64 (the oracle: no seqkern layer in it)."""
    ours = build(**overrides)
    theirs = build(layer_cls=TORCH_LAYER, **overrides)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, copy.deepcopy(theirs).double()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def forward_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor, cotangent: torch.Tensor) -> dict:
    logits, loss = model(idx, targets)
    model.zero_grad()
    (loss + (logits.double() * cotangent).sum()).backward()
    results = {"logits": logits, "loss": loss}
    results.update({f"grad_{name}": p.grad for name, p in model.named_parameters()})
    return results


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_forward_and_gradients_follow_the_rule(tie_embeddings):
    ours, theirs, ref = twins(tie_embeddings=tie_embeddings)
    idx, targets = tokens(3, 13), tokens(3, 13, seed=2)
    cotangent = torch.randn(3, 13, CONFIG["vocab_size"], generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
    expected = forward_and_grads(ref, idx, targets, cotangent)
    assert_all_rule(forward_and_grads(ours, idx, targets, cotangent),
                    forward_and_grads(theirs, idx, targets, cotangent), expected)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cached_generation_equals_recomputing(backend):
    ours, theirs, ref = (m.eval() for m in twins())
    prompt = tokens(3, 7)
    with seqkern.backend(backend):
        greedy = ours.generate(prompt, 25, do_sample=False)
    assert torch.equal(greedy, ours.generate(prompt, 25, do_sample=False, use_cache=False))
    assert torch.equal(greedy, theirs.generate(prompt, 25, do_sample=False, use_cache=False))
    # Each step's logits: the cached step vs torch.nn's model recomputing the prefix vs that model in float64.
    with seqkern.backend(backend):
        cache = ours.new_cache(3)
    for end in range(7, greedy.shape[1] + 1):
        start = 0 if end == 7 else end - 1
        with seqkern.backend(backend):
            step_logits = ours.forward_cached(greedy[:, start:end], cache)
        with torch.no_grad():
            recomputed = theirs(greedy[:, :end])[:, -1]
            expected = ref(greedy[:, :end])[:, -1]
        assert_rule(f"logits at {end}", step_logits, recomputed, expected)
    assert cache.length == greedy.shape[1] and cache.cache_seqlens.tolist() == [greedy.shape[1]] * 3


class BiasFreeLayer(torch.nn.TransformerEncoderLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, bias=False)


def test_cached_generation_of_a_bias_free_layer_class():
    model = build(layer_cls=BiasFreeLayer).eval()
    prompt = tokens(2, 5)
    assert torch.equal(model.generate(prompt, 12, do_sample=False),
                       model.generate(prompt, 12, do_sample=False, use_cache=False))


def test_cache_shapes_and_overflow():
    model = build().eval()
    cache = model.new_cache(2)
    assert isinstance(cache, KVCache) and len(cache.buffers) == CONFIG["num_layers"]
    assert cache.buffers[0].shape == (2, 2, CONFIG["nhead"], CONFIG["max_len"], CONFIG["d_model"] // CONFIG["nhead"])
    model.forward_cached(tokens(2, CONFIG["max_len"]), cache)
    with pytest.raises(ValueError, match="exceed max_len"):
        model.forward_cached(tokens(2, 1), cache)


def test_sampling():
    model = build().eval()
    prompt = tokens(2, 5)
    greedy = model.generate(prompt, 20, do_sample=False)
    assert torch.equal(model.generate(prompt, 20, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    draws = [model.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0][:, :5], prompt)
    assert not torch.equal(draws[0], greedy)  # a hot, untrained model does not sample its argmax 40 times
    cold = model.generate(prompt, 20, temperature=1e-4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(cold, greedy)  # temperature -> 0 concentrates the distribution on the argmax
    top_k = 3
    sampled = model.generate(prompt, 20, top_k=top_k, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        allowed = model(sampled[:, :-1])[:, 4:].topk(top_k, dim=-1).indices
    assert (allowed == sampled[:, 5:, None]).any(-1).all()


def test_tied_embeddings_share_storage_and_state_dict_round_trips():
    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    clone = GPT(**CONFIG, layer_cls=TORCH_LAYER)
    clone.load_state_dict(tied.state_dict())
    assert clone.lm_head.weight.data_ptr() == clone.token_embedding.weight.data_ptr()
    idx = tokens(2, 9)
    torch.testing.assert_close(clone.eval()(idx), tied.eval()(idx), rtol=0, atol=1e-5)
    assert set(untied.state_dict()) == set(tied.state_dict())


def test_empty_batch_and_new_tokens():
    model = build().eval()
    assert model(tokens(0, 4)).shape == (0, 4, CONFIG["vocab_size"])
    prompt = tokens(2, 3)
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(tokens(2, 5).float()), TypeError, "idx: expected an int64"),
    (lambda m: m(tokens(10)), ValueError, "idx: expected a 2-D"),
    (lambda m: m(tokens(1, 41)), ValueError, "max_len=40"),
    (lambda m: m(tokens(1, 5) + 37), ValueError, r"idx: expected ids in \[0, 37\)"),
    (lambda m: m(tokens(2, 5), tokens(2, 4)), ValueError, "targets: expected"),
    (lambda m: m.generate(tokens(1, 30), 11), ValueError, "exceeds max_len=40"),
    (lambda m: m.generate(tokens(1, 0), 3), ValueError, "at least one token"),
    (lambda m: m.generate(tokens(1, 3), -1), ValueError, "max_new_tokens"),
    (lambda m: m.generate(tokens(1, 3), 3, top_k=0), ValueError, "top_k"),
    (lambda m: m.generate(tokens(1, 3), 3, top_k=38), ValueError, "top_k"),
    (lambda m: m.generate(tokens(1, 3), 3, temperature=0.0), ValueError, "temperature"),
    (lambda m: m.generate(tokens(1, 3), 3, generator=0), TypeError, "generator"),
    (lambda m: m.forward_cached(tokens(2, 3), m.new_cache(3)), ValueError, "cache: expected a KVCache"),
    (lambda m: m.forward_cached(tokens(2, 3) + 37, m.new_cache(2)), ValueError, "idx: expected ids"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(build())


def test_bad_configuration():
    with pytest.raises(ValueError, match="nhead: expected a divisor of d_model"):
        GPT(**{**CONFIG, "nhead": 5})
    with pytest.raises(ValueError, match="max_len"):
        GPT(**{**CONFIG, "max_len": 0})


def test_char_gpt_example_runs():
    """examples/char_gpt.py end to end in a smoke configuration (~5 s of CPU time)."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "examples" / "char_gpt.py"), "--steps", "2", "--new-tokens", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in ("loss curve", "unigram entropy", "sample", "seqkern is", "same tokens"):
        assert expected in result.stdout, result.stdout
    assert "DIFFERENT tokens" not in result.stdout, result.stdout
