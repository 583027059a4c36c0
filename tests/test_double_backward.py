"""Double backward (create_graph=True): every differentiable op passes gradgradcheck in float64 on tiny shapes,
on the C++ kernels and under Triton; the drop-in modules' second-order gradients (a gradient penalty
||d loss / d input||^2 backpropagated to the weights, the input and the states) obey the rule against torch.nn's
own modules; an op without a formula refuses with an error naming it; torch.autograd.functional.hessian works."""
from __future__ import annotations

import pytest
import torch

import seqkern
from helpers import assert_all_rule, case_id, cell_args, layer_args

OPS = torch.ops.seqkern


def _gradgradcheck(run, args) -> bool:
    """gradgradcheck (fast mode: one random direction, enough to catch a wrong or missing graph) of run(*args)
    in every floating-point argument that requires grad."""
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def with_inputs(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return run(*full)

    inputs = [args[i] for i in positions]
    _assert_same_first_order(with_inputs, inputs)
    return torch.autograd.gradgradcheck(with_inputs, inputs, fast_mode=True)


def _assert_same_first_order(run, inputs) -> None:
    """The gradients a create_graph=True backward returns (the reference recompute) are the fused backward's:
    gradgradcheck alone would accept a consistently wrong first derivative."""
    outputs = run(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    fused = torch.autograd.grad(loss, inputs, retain_graph=True)
    with_graph = torch.autograd.grad(loss, inputs, create_graph=True)
    for a, b in zip(fused, with_graph):
        torch.testing.assert_close(b, a)


# ------------------------------------------------------------------------------------------------------------
# The recurrent ops.
# ------------------------------------------------------------------------------------------------------------
LSTM_CASES = [
    dict(seq_len=3, batch=2, input_size=2, hidden=3),
    dict(seq_len=4, batch=3, input_size=2, hidden=3, proj=2, reverse=True, lengths=[4, 2, 1]),
    dict(seq_len=3, batch=2, input_size=2, hidden=2, bias=False, lengths=[3, 2]),
]
SINGLE_STATE_CASES = [
    dict(seq_len=3, batch=2, input_size=2, hidden=3),
    dict(seq_len=4, batch=3, input_size=2, hidden=3, reverse=True, lengths=[4, 2, 1]),
    dict(seq_len=3, batch=2, input_size=2, hidden=2, bias=False),
]
# The double backward is the same reference recompute whatever kernel ran the forward: one small case checks
# it under Triton (the interpreter makes each forward slow), the C++ kernels take the others.
BACKEND_CASES = [(case, "cpu") for case in LSTM_CASES] + [
    pytest.param(LSTM_CASES[2], "triton", marks=pytest.mark.triton, id="triton")]


@pytest.mark.parametrize("case,backend", BACKEND_CASES, ids=lambda v: case_id(v) if isinstance(v, dict) else v)
def test_lstm_layer(case, backend):
    with seqkern.backend(backend):
        assert _gradgradcheck(lambda *a: OPS.lstm_forward(*a, True)[:3], layer_args(4, cell_state=True, **case))


@pytest.mark.parametrize("case", SINGLE_STATE_CASES, ids=case_id)
def test_gru_layer(case):
    with seqkern.backend("cpu"):
        assert _gradgradcheck(lambda *a: OPS.gru_forward(*a, True)[:2], layer_args(3, **case))


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("case", SINGLE_STATE_CASES, ids=case_id)
def test_rnn_layer(case, relu):
    with seqkern.backend("cpu"):
        assert _gradgradcheck(lambda *a: OPS.rnn_forward(*a, relu), layer_args(1, **case))


def _leaves(args):
    return tuple(a.requires_grad_() if a is not None else None for a in args)


@pytest.mark.parametrize("bias", [True, False])
def test_cell_ops(bias):
    with seqkern.backend("cpu"):
        assert _gradgradcheck(lambda *a: OPS.lstm_cell_forward(*a)[:2], _leaves(cell_args(4, 2, 3, bias=bias)))
        assert _gradgradcheck(lambda *a: OPS.gru_cell_forward(*a)[:1], _leaves(cell_args(3, 2, 3, bias=bias)))
        for relu in (False, True):
            args = _leaves(cell_args(1, 2, 3, bias=bias, state=False))
            assert _gradgradcheck(lambda *a: OPS.rnn_cell_forward(*a, relu), args)


# ------------------------------------------------------------------------------------------------------------
# Attention.
# ------------------------------------------------------------------------------------------------------------
def _qkv(batch=1, q_heads=2, kv_heads=2, len_q=3, len_k=4, dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_heads, len_q, dim), (batch, kv_heads, len_k, dim), (batch, kv_heads, len_k, dim)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


def _with_fixed_seed(fn):
    """seqkern.attention draws its dropout seed from torch's generator: the same seed every call."""
    def run(*args):
        torch.manual_seed(1234)
        return fn(*args)
    return run


ATTENTION_CASES = {
    "plain": (lambda q, k, v: seqkern.attention(q, k, v), {}),
    "causal": (lambda q, k, v: seqkern.attention(q, k, v, is_causal=True), {}),
    "window_bottom_right": (lambda q, k, v: seqkern.attention(q, k, v, window_size=(1, 0),
                                                               causal_alignment="bottom_right"), {}),
    "bool_mask": (lambda q, k, v: seqkern.attention(q, k, v, attn_mask=torch.tensor([[True, False, True, True]])), {}),
    "gqa": (lambda q, k, v: seqkern.attention(q, k, v, enable_gqa=True), dict(q_heads=4, kv_heads=2)),
    "dropout": (_with_fixed_seed(lambda q, k, v: seqkern.attention(q, k, v, dropout_p=0.3)), {}),
}


@pytest.mark.parametrize("name,backend", [(name, "cpu") for name in ATTENTION_CASES] + [
    pytest.param("plain", "triton", marks=pytest.mark.triton, id="plain-triton")])
def test_attention(name, backend):
    fn, shape = ATTENTION_CASES[name]
    with seqkern.backend(backend):
        assert _gradgradcheck(fn, _qkv(**shape))


def test_attention_float_mask_requiring_grad():
    q, k, v = _qkv()
    mask = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)  # broadcast over the heads
    with seqkern.backend("cpu"):
        assert _gradgradcheck(lambda q, k, v, m: seqkern.attention(q, k, v, attn_mask=m), (q, k, v, mask))


def test_attention_varlen():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 6, 6))
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32)
    with seqkern.backend("cpu"):
        assert _gradgradcheck(lambda q, k, v: seqkern.attention_varlen(q, k, v, cu_q, cu_k, 3, 4, is_causal=True),
                              (q, k, v))


@pytest.mark.parametrize("return_weights", [False, True])
def test_additive_attention(return_weights):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    args = (rand(2, 2, 3), rand(2, 4, 3), rand(2, 4, 2), rand(5, 3), rand(5, 3), rand(5))
    padding = torch.tensor([[False, False, True, False], [False, False, False, False]])
    with seqkern.backend("cpu"):
        assert _gradgradcheck(lambda *a: seqkern.additive_attention(*a, key_padding_mask=padding,
                                                                    return_weights=return_weights), args)


def test_decode_op_refuses_autograd():
    q, k, v = _qkv(len_q=1)
    out, _ = OPS.flash_attention_decode(q, k, v, None, 0.5, True, -1, 0)
    with pytest.raises(RuntimeError, match="flash_attention_decode.*seqkern.attention"):
        out.sum().backward()


def test_hessian_through_functional_transforms():
    """torch.autograd.functional.hessian of a scalar through the LSTM op equals the reference's."""
    args = layer_args(4, 2, 1, 2, 2, cell_state=True, requires_grad=False)

    def loss(x):
        return OPS.lstm_forward(x, *args[1:], True)[0].pow(2).sum()

    def loss_ref(x):
        return seqkern.reference.lstm_forward(x, *args[1:], False)[0].pow(2).sum()

    with seqkern.backend("cpu"):
        got = torch.autograd.functional.hessian(loss, args[0])
    torch.testing.assert_close(got, torch.autograd.functional.hessian(loss_ref, args[0]))


# ------------------------------------------------------------------------------------------------------------
# Modules against torch.nn: a gradient penalty, second-order gradients to every parameter and input.
# ------------------------------------------------------------------------------------------------------------
def _penalty_gradients(module, inputs: list[torch.Tensor], forward) -> dict[str, torch.Tensor]:
    """loss = sum(output * fixed weights); penalty = ||d loss / d inputs||^2 (create_graph=True); returns the
    first-order input gradients and d penalty / d (inputs, parameters)."""
    outputs = forward(module, *inputs)
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    params = dict(module.named_parameters())
    second = torch.autograd.grad(penalty, [*inputs, *params.values()], allow_unused=True, materialize_grads=True)
    results = {f"grad_input{i}": g for i, g in enumerate(first)}
    results.update({f"penalty_input{i}": g for i, g in enumerate(second[:len(inputs)])})
    results.update({f"penalty_{n}": g for n, g in zip(params, second[len(inputs):])})
    return results


def _compare_with_torch(torch_module, ours_module, shapes, forward, dtype):
    """Ours and torch.nn's in `dtype` against torch.nn's in float64 (the oracle), under the rule."""
    ours_module.load_state_dict(torch_module.state_dict())
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]

    def run(module, dt):
        return _penalty_gradients(module.to(dt), [d.to(dt).requires_grad_() for d in data], forward)

    ref64 = run(torch_module, torch.float64)
    theirs = run(torch_module, dtype)
    with seqkern.backend("cpu"):
        ours = run(ours_module, dtype)
    assert_all_rule(ours, theirs, ref64)


def _recurrent_forward(module, x, *states):
    out, final = module(x, states[0] if len(states) == 1 else tuple(states))
    return [out, *(final if isinstance(final, tuple) else (final,))]


RECURRENT = {
    "lstm": (torch.nn.LSTM, seqkern.nn.LSTM, dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)),
    "lstm_proj": (torch.nn.LSTM, seqkern.nn.LSTM, dict(input_size=3, hidden_size=4, proj_size=2)),
    "gru": (torch.nn.GRU, seqkern.nn.GRU, dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)),
    "rnn_tanh": (torch.nn.RNN, seqkern.nn.RNN, dict(input_size=3, hidden_size=4, num_layers=2)),
    "rnn_relu": (torch.nn.RNN, seqkern.nn.RNN, dict(input_size=3, hidden_size=4, nonlinearity="relu")),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_module_second_order(name, dtype):
    torch_cls, ours_cls, options = RECURRENT[name]
    torch.manual_seed(0)
    theirs, ours = torch_cls(**options).double(), ours_cls(**options).double()
    seq_len, batch = 4, 3
    stacked = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    hidden = options["hidden_size"]
    states = [(stacked, batch, options.get("proj_size", 0) or hidden)]
    if torch_cls is torch.nn.LSTM:
        states.append((stacked, batch, hidden))
    _compare_with_torch(theirs, ours, [(seq_len, batch, 3), *states], _recurrent_forward, dtype)


CELLS = {
    "lstm": (torch.nn.LSTMCell, seqkern.nn.LSTMCell, {}, 2),
    "gru": (torch.nn.GRUCell, seqkern.nn.GRUCell, {}, 1),
    "rnn_tanh": (torch.nn.RNNCell, seqkern.nn.RNNCell, {}, 1),
    "rnn_relu": (torch.nn.RNNCell, seqkern.nn.RNNCell, {"nonlinearity": "relu"}, 1),
}


def _cell_forward(module, x, *states):
    out = module(x, states[0] if len(states) == 1 else tuple(states))
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", CELLS)
def test_cell_module_second_order(name, dtype):
    torch_cls, ours_cls, options, num_states = CELLS[name]
    torch.manual_seed(0)
    theirs, ours = torch_cls(3, 4, **options).double(), ours_cls(3, 4, **options).double()
    _compare_with_torch(theirs, ours, [(2, 3)] + [(2, 4)] * num_states, _cell_forward, dtype)


def _mha_forward(need_weights: bool):
    def forward(module, query, key, value):
        mask = torch.tensor([[False, True, False, False]] * 3)
        # torch.nn's own double backward needs its math path (need_weights=True): SDPA's CPU flash backward
        # has no derivative. The output is the same either way.
        torch_nn = not isinstance(module, seqkern.nn.MultiheadAttention)
        out, weights = module(query, key, value, attn_mask=mask, need_weights=need_weights or torch_nn,
                              average_attn_weights=False)
        return [out, weights] if need_weights else [out]
    return forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_second_order(need_weights, dtype):
    torch.manual_seed(0)
    options = dict(embed_dim=6, num_heads=2, kdim=5, vdim=4, add_bias_kv=True)
    theirs, ours = torch.nn.MultiheadAttention(**options).double(), seqkern.nn.MultiheadAttention(**options).double()
    _compare_with_torch(theirs, ours, [(3, 2, 6), (4, 2, 5), (4, 2, 4)], _mha_forward(need_weights), dtype)


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_transformer_layer_gradgradcheck(layer):
    """torch.nn's own layers cannot be the oracle here (SDPA's CPU flash backward has no derivative)."""
    torch.manual_seed(0)
    options = dict(d_model=4, nhead=2, dim_feedforward=5, dropout=0.0, batch_first=True)
    gen = torch.Generator().manual_seed(1)
    x, memory = (torch.randn(1, n, 4, generator=gen, dtype=torch.float64, requires_grad=True) for n in (3, 2))
    if layer == "encoder":
        module = seqkern.nn.TransformerEncoderLayer(**options).double()
        mask = torch.nn.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64)
        args, run = (x,), lambda x: module(x, src_mask=mask, is_causal=True)
    else:
        module = seqkern.nn.TransformerDecoderLayer(**options).double()
        args, run = (x, memory), lambda x, m: module(x, m)
    with seqkern.backend("cpu"):
        assert _gradgradcheck(run, args)
