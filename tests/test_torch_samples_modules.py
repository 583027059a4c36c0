"""PyTorch's own module samples (torch.testing._internal.common_modules.module_db) run against seqkern's drop-ins.

For each sample of torch.nn.LSTM, GRU, RNN, their cells, and the Transformer layers, stacks and model: torch's
module is built from the sample's constructor arguments, seqkern's by `seqkern.convert` (same weights), and the
sample's forward input goes through both. Outputs and every gradient (inputs, initial states, parameters) obey
the correctness rule with torch's module in float64 as the oracle and torch's module in float32 as the yardstick.
Modules whose eval mode differs (torch.nn's Transformer fast path) are compared in eval without gradients too.
The samples' error inputs must raise the same kind of error from seqkern's module as from torch's.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import seqkern
from helpers import assert_all_rule

SAMPLED = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "Transformer")
INFOS = {info.module_cls.__name__: info for info in module_db
         if info.module_cls.__name__ in SAMPLED and info.module_cls.__module__.startswith("torch.nn.")}


def _samples(info, **kwargs):
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=True,
                                   **kwargs)


def _sample_params():
    for name, info in INFOS.items():
        for index, sample in enumerate(_samples(info)):
            yield pytest.param(name, index, id=f"{name}-{index}-{sample.desc or 'default'}")


def _map(fn, value):
    """fn applied to every tensor of a nested tuple/list/dict (sample inputs, module outputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    return value


def _flatten(value) -> list[torch.Tensor]:
    out = []
    _map(out.append, value)
    return out


def _modules(name: str, index: int):
    """(torch's module in float64, seqkern's drop-in in float64, the sample) with the same weights."""
    torch.manual_seed(index)  # the samples draw their tensors from torch's global generator
    sample = _samples(INFOS[name])[index]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn's notes on enable_nested_tensor and the fast path
        theirs = INFOS[name].module_cls(*sample.constructor_input.args,
                                        **sample.constructor_input.kwargs).to(torch.float64)
        ours, report = seqkern.convert(theirs)
    assert type(ours) is getattr(seqkern.nn, name), str(report)
    return theirs, ours, sample


def _run(module, sample, dtype, cotangents=None, grad=True) -> dict[str, torch.Tensor]:
    """The sample's forward in `dtype`: every output and, with `grad`, the gradient of a weighted sum of the
    outputs with respect to every floating input that requires grad and every parameter."""
    leaves = []

    def cast(t):
        if not t.is_floating_point():
            return t
        leaf = t.detach().to(dtype).requires_grad_(grad and t.requires_grad)
        if leaf.requires_grad:
            leaves.append(leaf)
        return leaf

    args, kwargs = _map(cast, sample.forward_input.args), _map(cast, sample.forward_input.kwargs)
    with warnings.catch_warnings(), torch.set_grad_enabled(grad):
        warnings.simplefilter("ignore")
        outputs = _flatten(module(*args, **kwargs))
    results = {f"output_{i}": o for i, o in enumerate(outputs)}
    if grad:
        if cotangents is None:
            gen = torch.Generator().manual_seed(1)
            cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
        loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(loss, [*leaves, *params.values()], allow_unused=True)
        names = [f"grad_input_{i}" for i in range(len(leaves))] + [f"grad_{n}" for n in params]
        # A parameter the sample's forward does not reach gets no gradient from either module: compared as 0.
        results.update({n: torch.zeros_like(p) if g is None else g
                        for n, g, p in zip(names, grads, [*leaves, *params.values()])})
    return results


def _compare(name: str, index: int, training: bool) -> None:
    oracle, ours, sample = _modules(name, index)
    oracle.train(training)
    ours.train(training)
    theirs = copy.deepcopy(oracle).to(torch.float32)
    ours = ours.to(torch.float32)
    expected = _run(oracle, sample, torch.float64, grad=training)
    baseline = _run(theirs, sample, torch.float32, grad=training)
    got = _run(ours, sample, torch.float32, grad=training)
    assert_all_rule(got, baseline, expected)


@pytest.mark.parametrize("name, index", list(_sample_params()))
def test_sample_matches_torch(name, index):
    _compare(name, index, training=True)
    if INFOS[name].train_and_eval_differ:
        _compare(name, index, training=False)


def _error_params():
    for name, info in INFOS.items():
        if info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                               training=True)
        for index, error in enumerate(errors):
            yield pytest.param(name, index, id=f"{name}-{index}-{error.error_type.__name__}")


@pytest.mark.parametrize("name, index", list(_error_params()))
def test_error_sample_raises_as_torch(name, index):
    info = INFOS[name]
    error = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                          training=True)[index]
    sample = error.module_error_input
    ours_cls = getattr(seqkern.nn, name)
    constructor = sample.constructor_input

    def build(cls):
        return cls(*constructor.args, **constructor.kwargs)

    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=error.error_regex):
            build(info.module_cls)
        with pytest.raises(error.error_type):
            build(ours_cls)
        return
    forward = sample.forward_input
    with pytest.raises(error.error_type, match=error.error_regex):
        build(info.module_cls)(*forward.args, **forward.kwargs)
    with pytest.raises(error.error_type):
        build(ours_cls)(*forward.args, **forward.kwargs)
