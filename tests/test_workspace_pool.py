"""The C++ recurrent layers' workspace cache (csrc/cpu/workspace_pool.h, seqkern/memory.py): tensors it hands to
the user behave as torch.nn's (resize_, set_, in-place ops), seqkern.empty_cache() frees the idle blocks and
nothing in use, $SEQKERN_WORKSPACE_CACHE_MB caps or turns off the cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import seqkern
from seqkern import memory

# T, B, hidden: the (T, B, hidden) float32 output is 480 KB, above the pool's 256 KB threshold.
T, B, H = 40, 24, 128


def _pair(family, input_size=64):
    """A seqkern.nn layer and torch.nn's with the same weights."""
    ours = getattr(seqkern.nn, family)(input_size, H)
    theirs = getattr(torch.nn, family)(input_size, H)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _resize_like(ours, theirs):
    """The same resize_ / in-place / set_ sequence on our tensor and torch's (same shape, close values) gives the
    same shapes, storage sizes, addresses kept or changed, and values."""
    original = ours.clone()
    length = ours.shape[0]
    for tensor in (ours, theirs):
        tensor.resize_(length + 10, *tensor.shape[1:])  # past the storage: reallocates, keeps the prefix
        tensor[length:].fill_(1.5)
    assert ours.shape == theirs.shape and ours.untyped_storage().nbytes() == theirs.untyped_storage().nbytes()
    assert torch.equal(ours[:length], original)
    addresses = (ours.data_ptr(), theirs.data_ptr())
    for tensor in (ours, theirs):
        tensor.resize_(3, *tensor.shape[1:])  # smaller: the storage stays
        tensor.mul_(2)
        tensor.resize_(length + 10, *tensor.shape[1:])
    assert (ours.data_ptr(), theirs.data_ptr()) == addresses
    assert torch.equal(ours[:3], 2 * original[:3]) and torch.equal(ours[3:length], original[3:])
    torch.testing.assert_close(ours, theirs)
    for tensor in (ours, theirs):
        tensor.set_()
    assert ours.shape == theirs.shape == (0,)


def test_resize_of_a_returned_output_as_torch_nn():
    ours, theirs = _pair("LSTM")
    x = torch.randn(T, B, 64)
    with torch.no_grad():
        _resize_like(ours(x)[0], theirs(x)[0])


def test_resize_of_a_returned_grad_input_as_torch_nn():
    """grad_input (a view of the layer's pooled (T*B, I) result) resizes like torch.nn's."""
    ours, theirs = _pair("GRU", input_size=H)
    x = torch.randn(T, B, H, requires_grad=True)
    grads = [torch.autograd.grad(layer(x)[0].square().sum(), [x])[0] for layer in (ours, theirs)]
    _resize_like(*grads)


def test_growth_reallocates_through_the_pool():
    """A resize_ past the block takes the new block from the pool (it comes back to the pool when the tensor
    dies), and gives the old one back at once."""
    ours, _ = _pair("LSTM")
    with torch.no_grad():
        output = ours(torch.randn(T, B, 64))[0]
    seqkern.empty_cache()
    old_bytes = output.untyped_storage().nbytes()
    output.resize_(2 * T, B, H)
    assert memory.cached_bytes() >= old_bytes
    before = memory.cached_bytes()
    new_bytes = output.untyped_storage().nbytes()
    del output
    assert memory.cached_bytes() - before >= new_bytes


def test_empty_cache_frees_idle_blocks_and_keeps_live_tensors():
    ours, _ = _pair("LSTM")
    params = list(ours.parameters())
    x = torch.randn(T, B, 64, requires_grad=True)

    def step():
        output = ours(x)[0]
        return [output.detach(), *torch.autograd.grad(output.square().sum(), [x, *params])]

    kept = step()[0]  # the output, its block in use; the step's temporaries and other results are idle now
    expected = kept.clone()
    cached = memory.cached_bytes()
    assert cached > 0
    assert seqkern.empty_cache() == cached
    assert memory.cached_bytes() == 0 and seqkern.empty_cache() == 0
    assert torch.equal(kept, expected)
    kept_bytes = kept.untyped_storage().nbytes()
    del kept
    # A block in use at empty_cache comes back when released (a reused block may be up to twice the request).
    assert kept_bytes <= memory.cached_bytes() <= 2 * kept_bytes
    first = step()
    seqkern.empty_cache()
    for got, want in zip(step(), first):  # the cache refilled from nothing gives the same results
        assert torch.equal(got, want)
    assert torch.equal(first[0], expected)


def test_cache_limit_from_environment(monkeypatch):
    assert seqkern._extension.AVAILABLE, seqkern._extension.IMPORT_ERROR
    assert memory.max_cached_bytes() == memory.cache_limit_from_environment()  # this process's, set at import
    monkeypatch.delenv(memory.CACHE_VAR, raising=False)
    assert memory.cache_limit_from_environment() == 128 << 20
    for value, limit in (("0", 0), (" 64 ", 64 << 20)):
        monkeypatch.setenv(memory.CACHE_VAR, value)
        assert memory.cache_limit_from_environment() == limit
    for value in ("-1", "1.5", "64MB", "²"):
        monkeypatch.setenv(memory.CACHE_VAR, value)
        with pytest.raises(ValueError, match=r"SEQKERN_WORKSPACE_CACHE_MB: expected a whole number"):
            memory.configure()  # raises before it sets anything


# Run with SEQKERN_WORKSPACE_CACHE_MB=0: no cache (results as torch.nn's, resizable, nothing kept); then a 1 MB cap.
_OFF_THEN_CAPPED = """
import os, torch, seqkern
from seqkern import memory

def step():
    ours = seqkern.nn.LSTM(64, 128)
    theirs = torch.nn.LSTM(64, 128)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(40, 24, 64)
    for layer in (ours, theirs):
        output = layer(x)[0]
        yield [output.detach(), *torch.autograd.grad(output.square().sum(), list(layer.parameters()))]

assert memory.max_cached_bytes() == 0
got, want = step()
for a, b in zip(got, want):  # a sanity check of the unpooled path (the rule is test_lstm.py's)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
got[0].resize_(50, 24, 128)
del got, want
assert memory.cached_bytes() == 0 and seqkern.empty_cache() == 0

os.environ["SEQKERN_WORKSPACE_CACHE_MB"] = "1"
memory.configure()
assert memory.max_cached_bytes() == 1 << 20
list(step())
cached = memory.cached_bytes()
assert 0 < cached <= 1 << 20, cached  # the step leaves ~4.7 MB of blocks idle
assert seqkern.empty_cache() == cached
print("ok")
"""


def test_environment_turns_the_cache_off_or_caps_it():
    env = dict(os.environ, **{memory.CACHE_VAR: "0"})
    result = subprocess.run([sys.executable, "-c", _OFF_THEN_CAPPED], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-2000:] + result.stderr[-4000:]
