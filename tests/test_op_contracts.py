"""One contract per op: a bad direct call to torch.ops.seqkern.* is refused the same way in eager (the C++
kernel's checks) and under torch.compile (the fake implementation's torch._check, run here under
FakeTensorMode): a RuntimeError naming the argument, before anything runs. Valid calls pass the fakes."""
from __future__ import annotations

import re

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch._subclasses.fake_tensor import FakeTensorMode

import seqkern  # noqa: F401  (loads the ops)

OPS = torch.ops.seqkern
T, B, I, H = 3, 2, 4, 5  # steps, batch, input size, hidden size


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _layer(gates: int, lstm: bool = False) -> dict:
    args = dict(input=_randn(T, B, I), h0=_randn(B, H))
    if lstm:
        args["c0"] = _randn(B, H)
    args.update(w_ih=_randn(gates * H, I), w_hh=_randn(gates * H, H), b_ih=_randn(gates * H), b_hh=_randn(gates * H))
    if lstm:
        args["w_hr"] = None
    args.update(batch_sizes=None, lengths=None, resets=None)
    if gates > 1:
        args.update(zoneout=0.0, zoneout_seed=None)
    args["reverse"] = False
    return args


def _attention() -> dict:
    return dict(q=_randn(1, 2, 3, 4), k=_randn(1, 2, 5, 4), v=_randn(1, 2, 5, 4), attn_mask=None, cu_seqlens_q=None,
                cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, scale=0.5, window_left=-1, window_right=-1,
                bottom_right=False, dropout_p=0.0, dropout_seed=None)


def _attention_backward() -> dict:
    forward = _attention()
    args = dict(grad_out=_randn(1, 2, 3, 4), q=forward.pop("q"), k=forward.pop("k"), v=forward.pop("v"),
                out=_randn(1, 2, 3, 4), lse=_randn(1, 2, 3, dtype=torch.float64))  # float64 for every dtype
    return {**args, **forward, "want_grad_scores": False}


def _additive() -> dict:
    return dict(query_proj=_randn(2, 3, 4), key_proj=_randn(2, 5, 4), values=_randn(2, 5, 6), v=_randn(4),
                key_padding_mask=None, return_weights=True)


def _additive_backward() -> dict:
    args = _additive()
    del args["key_padding_mask"], args["return_weights"]
    return dict(grad_out=_randn(2, 3, 6), grad_weights=None, **args, out=_randn(2, 3, 6), weights=_randn(2, 3, 5))


# op -> its valid arguments by name (schema order)
VALID = {
    "lstm_forward": lambda: {**_layer(4, lstm=True), "save_workspace": True},
    "lstm_backward": lambda: dict(
        grad_output=_randn(T, B, H), grad_h_n=_randn(B, H), grad_c_n=_randn(B, H), input=_randn(T, B, I),
        h0=_randn(B, H), c0=_randn(B, H), w_ih=_randn(4 * H, I), w_hh=_randn(4 * H, H), w_hr=None,
        output=_randn(T, B, H), gates=_randn(T, B, 4 * H), cells=_randn(T, B, H), batch_sizes=None, lengths=None,
        resets=None, zoneout=0.0, zoneout_seed=None, reverse=False, has_bias=True),
    "lstm_cell_forward": lambda: dict(gates_x=_randn(B, 4 * H), gates_h=_randn(B, 4 * H), cx=_randn(B, H),
                                      b_ih=_randn(4 * H), b_hh=_randn(4 * H)),
    "lstm_cell_backward": lambda: dict(grad_hy=_randn(B, H), grad_cy=_randn(B, H), cx=_randn(B, H), cy=_randn(B, H),
                                       workspace=_randn(B, 4 * H), has_bias=True),
    "gru_forward": lambda: {**_layer(3), "save_workspace": True},
    "gru_backward": lambda: dict(
        grad_output=_randn(T, B, H), grad_h_n=_randn(B, H), input=_randn(T, B, I), h0=_randn(B, H),
        w_ih=_randn(3 * H, I), w_hh=_randn(3 * H, H), output=_randn(T, B, H), workspace=_randn(T, B, 4 * H),
        batch_sizes=None, lengths=None, resets=None, zoneout=0.0, zoneout_seed=None, reverse=False, has_bias=True),
    "gru_cell_forward": lambda: dict(gates_x=_randn(B, 3 * H), gates_h=_randn(B, 3 * H), hx=_randn(B, H),
                                     b_ih=_randn(3 * H), b_hh=_randn(3 * H)),
    "gru_cell_backward": lambda: dict(grad_hy=_randn(B, H), hx=_randn(B, H), workspace=_randn(B, 4 * H),
                                      has_bias=True),
    "rnn_forward": lambda: {**_layer(1), "relu": False},
    "rnn_backward": lambda: dict(
        grad_output=_randn(T, B, H), grad_h_n=_randn(B, H), input=_randn(T, B, I), h0=_randn(B, H),
        w_ih=_randn(H, I), w_hh=_randn(H, H), output=_randn(T, B, H), batch_sizes=None, lengths=None, resets=None,
        reverse=False, relu=False, has_bias=True),
    "rnn_cell_forward": lambda: dict(gates_x=_randn(B, H), gates_h=_randn(B, H), b_ih=_randn(H), b_hh=_randn(H),
                                     relu=False),
    "rnn_cell_backward": lambda: dict(grad_hy=_randn(B, H), hy=_randn(B, H), relu=False, has_bias=True),
    "flash_attention_forward": _attention,
    "flash_attention_backward": _attention_backward,
    "flash_attention_decode": lambda: dict(q=_randn(2, 4, 1, 3), k_cache=_randn(2, 2, 6, 3),
                                           v_cache=_randn(2, 2, 6, 5), cache_seqlens=None, scale=0.5, is_causal=True,
                                           window_left=-1, num_splits=0),
    "additive_attention_forward": _additive,
    "additive_attention_backward": _additive_backward,
}

# (op, the argument the error must name, changes to the valid arguments)
BAD = [
    ("lstm_forward", "h0", dict(h0=_randn(B, H + 1))),
    ("lstm_forward", "c0", dict(c0=_randn(B + 1, H))),
    ("lstm_forward", "w_hh", dict(w_hh=_randn(4 * H, H, dtype=torch.float64))),
    ("lstm_forward", "b_ih and b_hh", dict(b_hh=None)),
    ("lstm_forward", "batch_sizes", dict(batch_sizes=torch.tensor([2, 1], dtype=torch.int64))),
    ("lstm_forward", "input", dict(input=_randn(T, B))),
    ("lstm_forward", "input", dict(input=torch.ones(T, B, I, dtype=torch.int32))),
    ("lstm_forward", "w_hr", dict(w_hr=_randn(H, H + 1))),
    ("lstm_backward", "gates", dict(gates=_randn(0))),
    ("lstm_backward", "grad_c_n", dict(grad_c_n=_randn(B, H + 2))),
    ("lstm_cell_forward", "gates_x", dict(gates_x=_randn(B, 3 * H))),
    ("lstm_cell_forward", "b_ih", dict(b_ih=_randn(H), b_hh=_randn(H))),
    ("lstm_cell_backward", "workspace", dict(workspace=_randn(B, H))),
    ("gru_forward", "w_ih", dict(w_ih=_randn(3 * H + 1, I))),
    ("gru_forward", "b_ih", dict(b_ih=_randn(H), b_hh=_randn(H))),
    ("gru_backward", "workspace", dict(workspace=_randn(T, B, 3 * H))),
    ("gru_cell_forward", "hx", dict(hx=_randn(H))),
    ("gru_cell_backward", "grad_hy", dict(grad_hy=_randn(B + 1, H))),
    ("rnn_forward", "h0", dict(h0=_randn(B, H, dtype=torch.float64))),
    ("rnn_backward", "output", dict(output=_randn(T + 1, B, H))),
    ("rnn_cell_forward", "gates_h", dict(gates_h=_randn(B, H + 1))),
    ("rnn_cell_backward", "grad_hy", dict(grad_hy=_randn(B, H - 1))),
    ("flash_attention_forward", "k", dict(k=_randn(1, 2, 5, 3))),
    ("flash_attention_forward", "heads", dict(k=_randn(1, 3, 5, 4), v=_randn(1, 3, 5, 4))),
    ("flash_attention_forward", "attn_mask", dict(attn_mask=_randn(1, 2, 3, 4))),
    ("flash_attention_forward", "q", dict(q=_randn(2, 3, 4))),
    ("flash_attention_forward", "dropout_p", dict(dropout_p=1.0)),
    ("flash_attention_forward", "dropout_seed", dict(dropout_p=0.5)),
    ("flash_attention_forward", "cu_seqlens", dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32))),
    ("flash_attention_forward", "scale", dict(scale=float("inf"))),
    ("flash_attention_backward", "lse", dict(lse=_randn(1, 2, 3))),
    ("flash_attention_backward", "grad_out", dict(grad_out=_randn(1, 2, 3, 5))),
    ("flash_attention_decode", "heads", dict(k_cache=_randn(2, 3, 6, 3), v_cache=_randn(2, 3, 6, 5))),
    ("flash_attention_decode", "cache_seqlens", dict(cache_seqlens=torch.tensor([1, 2]))),
    ("flash_attention_decode", "num_splits", dict(num_splits=-1)),
    ("additive_attention_forward", "v", dict(v=_randn(5))),
    ("additive_attention_forward", "key_padding_mask", dict(key_padding_mask=torch.zeros(2, 5))),
    ("additive_attention_forward", "values", dict(values=_randn(2, 4, 6))),
    ("additive_attention_backward", "weights", dict(weights=_randn(2, 3, 5, dtype=torch.float64))),
]


def _call_fake(op: str, args: dict):
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()]
        return getattr(OPS, op)(*fake)


@pytest.mark.parametrize("op", VALID)
def test_valid_arguments_pass_the_contract(op):
    args = VALID[op]()
    fake_results = _call_fake(op, args)
    real_results = getattr(OPS, op)(*args.values())
    for fake, real in zip(*(r if isinstance(r, tuple) else (r,) for r in (fake_results, real_results))):
        assert fake.shape == real.shape and fake.dtype == real.dtype, op


@pytest.mark.parametrize("op,name,changes", BAD, ids=[f"{op}-{name}" for op, name, _ in BAD])
def test_bad_arguments_refused_alike_in_eager_and_under_compile(op, name, changes):
    args = {**VALID[op](), **changes}
    with pytest.raises(RuntimeError, match=re.escape(name)):
        getattr(OPS, op)(*args.values())
    with pytest.raises(RuntimeError, match=re.escape(name)):
        _call_fake(op, args)


# --------------------------------------------------------------------------------------------------
# The Autograd kernels (seqkern/ops/_registry.py register_autograd).
# --------------------------------------------------------------------------------------------------
_TEST_LIBRARY = torch.library.Library("seqkern_contract_test", "DEF")
_TEST_LIBRARY.define("with_default(Tensor x, float scale=1.0) -> Tensor")
_TEST_LIBRARY.define("with_keyword(Tensor x, *, float scale) -> Tensor")


@pytest.mark.parametrize("name", ["with_default", "with_keyword"])
def test_autograd_registration_refuses_arguments_the_formula_would_not_see(name, monkeypatch):
    """register_autograd hands setup_context the arguments as the dispatcher delivers them (no schema defaults
    filled in per call): a schema with a default value, which the dispatcher may drop, or a keyword-only argument
    is refused when the op is registered."""
    from seqkern.ops import _registry

    monkeypatch.setattr(_registry, "op", lambda op_name: getattr(torch.ops.seqkern_contract_test, op_name).default)
    with pytest.raises(RuntimeError, match="no default values and no keyword-only"):
        _registry.register_autograd(name, lambda ctx, grad: (grad, None), lambda ctx, inputs, output: None)


def test_formulas_see_which_of_the_op_arguments_need_grad():
    """The Autograd kernel passes the op's arguments and one more (the dispatch key set) to autograd.Function;
    the formula's ctx.needs_input_grad must be the op's alone: with only w_hh and h0 requiring grad, the
    create_graph=True gradients (the reference recompute, which differentiates exactly the arguments
    needs_input_grad names) match torch.nn.GRU's."""
    torch.manual_seed(0)
    x, h0 = _randn(T, B, I), _randn(1, B, H).requires_grad_()
    ours, theirs = seqkern.nn.GRU(I, H), torch.nn.GRU(I, H)
    theirs.load_state_dict(ours.state_dict())
    grads = []
    for module in (ours, theirs):
        for p in module.parameters():
            p.requires_grad_(p is module.weight_hh_l0)
        output, h_n = module(x, h0)
        grads.append(torch.autograd.grad(output.square().sum() + h_n.sum(), (module.weight_hh_l0, h0), create_graph=True))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad): the Autograd kernel runs an op below
# autograd when no argument requires grad, which drops any tangent riding on the arguments (torch.func.jvp
# through seqkern.nn.GRU returned a tangent of zeros). An argument carrying a tangent now runs the op's reference
# (composed torch ops, which carry tangents); the decode op, which has none, refuses. The oracle: central finite
# differences in float64 (independent of seqkern), and torch.nn's own jvp where torch has the layer.
# ------------------------------------------------------------------------------------------------------------
def _modules_for_forward_ad():
    """(name, seqkern callable of one tensor x (T=4, B=3, 6), torch.nn's counterpart or None)."""
    torch.manual_seed(0)
    pairs = []
    for name, ours, theirs in [
        ("LSTM proj bidirectional x2", seqkern.nn.LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3),
         torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3)),
        ("GRU", seqkern.nn.GRU(6, 5), torch.nn.GRU(6, 5)),
        ("RNN relu", seqkern.nn.RNN(6, 5, nonlinearity="relu"), torch.nn.RNN(6, 5, nonlinearity="relu")),
        ("LSTMCell", seqkern.nn.LSTMCell(6, 5), torch.nn.LSTMCell(6, 5)),
        ("GRUCell", seqkern.nn.GRUCell(6, 5), torch.nn.GRUCell(6, 5)),
        ("RNNCell", seqkern.nn.RNNCell(6, 5), torch.nn.RNNCell(6, 5)),
        ("LayerNormLSTM", seqkern.nn.LayerNormLSTM(6, 5), None),
        ("LayerNormGRU", seqkern.nn.LayerNormGRU(6, 5), None),
    ]:
        ours, theirs = ours.double(), theirs.double() if theirs is not None else None
        if theirs is not None:
            theirs.load_state_dict(ours.state_dict())
        cell = "Cell" in name
        pairs.append((name, _first_output(ours, cell), _first_output(theirs, cell) if theirs is not None else None))
    keys = torch.randn(3, 7, 6, dtype=torch.float64)
    values = torch.randn(3, 7, 4, dtype=torch.float64)
    w_q, w_k, v = (torch.randn(*s, dtype=torch.float64) for s in ((8, 6), (8, 6), (8,)))
    pairs.append(("additive_attention",
                  lambda x: seqkern.additive_attention(x.transpose(0, 1), keys, values, w_q, w_k, v), None))
    k, vv = torch.randn(3, 2, 9, 6, dtype=torch.float64), torch.randn(3, 2, 9, 4, dtype=torch.float64)

    def math(q):
        return torch.softmax(q @ k.transpose(-1, -2) / 6 ** 0.5, dim=-1) @ vv

    # (T, B, 6) -> q (B=3, heads 2, 2 queries, 6): a decoding shape, which must leave the decode kernel.
    pairs.append(("attention", lambda x: seqkern.attention(x[:2].permute(1, 0, 2)[:, None].expand(3, 2, 2, 6), k, vv),
                  lambda x: math(x[:2].permute(1, 0, 2)[:, None].expand(3, 2, 2, 6))))
    return pairs


def _first_output(module, cell: bool):
    """x (T, B, 6) -> the output sequence (a layer) or h' of the first step's input (a cell)."""
    def run(x):
        out = module(x[0]) if cell else module(x)[0]
        return out[0] if isinstance(out, tuple) else out
    return run


@pytest.mark.parametrize("case", _modules_for_forward_ad(), ids=lambda case: case[0])
def test_forward_mode_ad_carries_the_tangent(case):
    """torch.func.jvp of every differentiable module / function against central finite differences (and torch.nn's
    jvp where torch has the layer), float64; the primal output equals the plain call's."""
    _, ours, theirs = case
    gen = torch.Generator().manual_seed(1)
    x, tangent = (torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    primal, got = torch.func.jvp(ours, (x,), (tangent,))
    eps = 1e-6
    expected = (ours(x + eps * tangent) - ours(x - eps * tangent)) / (2 * eps)
    assert got.abs().max() > 0.01  # not the zero tangent of the bug
    torch.testing.assert_close(primal, ours(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    if theirs is not None:
        torch.testing.assert_close(got, torch.func.jvp(theirs, (x,), (tangent,))[1], rtol=1e-9, atol=1e-11)


def test_forward_mode_ad_through_parameters_and_initial_states():
    """Tangents on the weights (torch.func.functional_call) and on h0 / c0, and the forward_ad API with frozen
    parameters (no argument requires grad: the case that ran below autograd), against torch.nn.LSTM."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(2)
    ours, theirs = seqkern.nn.LSTM(6, 5).double(), torch.nn.LSTM(6, 5).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    h0, c0 = (torch.randn(1, 3, 5, dtype=torch.float64) for _ in range(2))
    params = {name: p.detach() for name, p in ours.named_parameters()}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}

    def run(module):
        def f(p, h, c):
            return torch.func.functional_call(module, p, (x, (h, c)))[1][1]  # c_n
        return torch.func.jvp(f, (params, h0, c0), (tangents, torch.randn_like(h0), torch.randn_like(c0)))[1]

    torch.manual_seed(3)
    got = run(ours)
    torch.manual_seed(3)
    torch.testing.assert_close(got, run(theirs), rtol=1e-9, atol=1e-11)

    for module in (ours, theirs):
        module.requires_grad_(False)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        results = [fwAD.unpack_dual(m(fwAD.make_dual(x, t))[0]).tangent for m in (ours, theirs)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-11)


def test_jacfwd_of_a_layer_matches_torch():
    torch.manual_seed(4)
    ours, theirs = seqkern.nn.GRU(3, 4).double(), torch.nn.GRU(3, 4).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jacfwd(lambda x: ours(x)[0])(x), torch.func.jacfwd(lambda x: theirs(x)[0])(x),
                               rtol=1e-9, atol=1e-11)


def test_transforms_refused_by_the_decode_op():
    """The decode op has no derivative of either kind: called directly, a tangent or functorch's grad transform
    raises, never a silent zero."""
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="flash_attention_decode has no derivative for torch.func transforms"):
        torch.func.jvp(lambda q: OPS.flash_attention_decode(q, k, v, None, 0.3, False, -1, 0)[0], (q,),
                       (torch.randn_like(q),))
    with pytest.raises(RuntimeError, match="flash_attention_decode has no derivative for torch.func transforms"):
        torch.func.grad(lambda q: OPS.flash_attention_decode(q, k, v, None, 0.3, False, -1, 0)[0].sum())(q)


def test_attention_decode_differentiates_through_its_reference():
    """seqkern.attention_decode runs its reference when differentiated, by gradient (as before) and by tangent
    alike: jvp, the forward_ad API and functorch's grad equal the same through the composed math (float64, GQA,
    lengths of the cache)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 2, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64),
               torch.randn(2, 2, 9, 8, dtype=torch.float64))
    lengths = torch.tensor([9, 6])
    keep = torch.arange(9)[None, :] < lengths[:, None]
    # The last 2 positions of each sequence, causal: query i sees keys [0, lengths - 2 + i].
    visible = torch.arange(9)[None, None, :] <= (lengths[:, None, None] - 2 + torch.arange(2)[None, :, None])
    mask = (keep[:, None, :] & visible)[:, None]

    def ours(q, k, v):
        return seqkern.attention_decode(q, k, v, lengths.to(torch.int32), is_causal=True)

    def theirs(q, k, v):  # the math (torch's CPU SDPA has no forward-mode derivative)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    for got, want in zip(torch.func.jvp(ours, (q, k, v), tangents), torch.func.jvp(theirs, (q, k, v), tangents)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    with forward_ad.dual_level():
        dual = forward_ad.unpack_dual(ours(forward_ad.make_dual(q, tangents[0]), k, v)).tangent
    torch.testing.assert_close(dual, torch.func.jvp(lambda q: theirs(q, k, v), (q,), (tangents[0],))[1],
                               rtol=1e-9, atol=1e-11)
    for got, want in zip(torch.func.grad(lambda *t: ours(*t).square().sum(), argnums=(0, 1, 2))(q, k, v),
                         torch.func.grad(lambda *t: theirs(*t).square().sum(), argnums=(0, 1, 2))(q, k, v)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# functorch's grad transform (torch.func.grad, vjp, jacrev, hessian, per-sample gradients through vmap(grad)):
# autograd.Function.apply inside an Autograd kernel fails under it, so the kernel runs the op's reference there.
def _gru_pair():
    torch.manual_seed(6)
    ours, theirs = seqkern.nn.GRU(5, 4).double(), torch.nn.GRU(5, 4).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_functorch_grad_jacrev_and_hessian_match_torch():
    ours, theirs = _gru_pair()
    x = torch.randn(3, 2, 5, dtype=torch.float64)

    def loss(module):
        return lambda x: module(x)[0].square().sum()

    torch.testing.assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(theirs))(x), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.func.jacrev(lambda x: ours(x)[0])(x), torch.func.jacrev(lambda x: theirs(x)[0])(x),
                               rtol=1e-9, atol=1e-11)
    small = x[:2, :1]
    torch.testing.assert_close(torch.func.hessian(loss(ours))(small), torch.func.hessian(loss(theirs))(small),
                               rtol=1e-9, atol=1e-11)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (4, 6, 6))

    def math(q):
        return torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v

    torch.testing.assert_close(torch.func.grad(lambda q: seqkern.attention(q, k, v).sin().sum())(q),
                               torch.func.grad(lambda q: math(q).sin().sum())(q), rtol=1e-9, atol=1e-11)


def test_per_sample_gradients_through_vmap_of_grad():
    """The per-sample gradients of the weights (vmap over the batch of grad of functional_call, as Opacus-style
    training computes them) equal torch.nn.GRU's gradients taken one sample at a time."""
    ours, theirs = _gru_pair()
    xs = torch.randn(4, 3, 5, dtype=torch.float64)  # 4 samples of 3 steps
    params = {name: p.detach() for name, p in ours.named_parameters()}

    def sample_loss(p, x):
        return torch.func.functional_call(ours, p, (x[:, None],))[0].square().sum()

    got = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        theirs.zero_grad()
        theirs(x[:, None])[0].square().sum().backward()
        for name, p in theirs.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}[{i}]: {m}")


def test_vmap_of_a_layer_equals_the_loop():
    """torch.func.vmap runs the ops through functorch's per-sample fallback: the result equals the loop's."""
    torch.manual_seed(5)
    module = seqkern.nn.GRU(3, 4)
    xs = torch.randn(3, 5, 2, 3)
    torch.testing.assert_close(torch.func.vmap(lambda x: module(x)[0])(xs), torch.stack([module(x)[0] for x in xs]))


def _modules_called_without_gradients():
    """One module of each op family that run_op enters below autograd, and an input for it."""
    torch.manual_seed(6)
    x = torch.randn(5, 2, 8)
    keys = torch.randn(64, 2, 8)  # 64 queries: the attention forward kernel, not the decode route
    return [
        (seqkern.nn.GRU(8, 8), (x,), "gru_forward"),
        (seqkern.nn.LSTM(8, 8), (x,), "lstm_forward"),
        (seqkern.nn.RNN(8, 8), (x,), "rnn_forward"),
        (seqkern.nn.GRUCell(8, 8), (x[0],), "gru_cell_forward"),
        (seqkern.nn.LSTMCell(8, 8), (x[0],), "lstm_cell_forward"),
        (seqkern.nn.RNNCell(8, 8), (x[0],), "rnn_cell_forward"),
        (seqkern.nn.MultiheadAttention(8, 2), (keys, keys, keys), "flash_attention_forward"),
    ]


def test_calls_without_gradients_equal_those_with_and_record_no_graph():
    """Without gradients (no_grad, or no input that requires one) run_op enters the ops below autograd: the results
    are bitwise those of the same call under autograd, and carry no graph."""
    for module, inputs, _ in _modules_called_without_gradients():
        with_graph = module(*inputs)
        with torch.no_grad():
            without = module(*inputs)
        for a, b in zip(torch.utils._pytree.tree_leaves(with_graph), torch.utils._pytree.tree_leaves(without)):
            if isinstance(a, torch.Tensor):
                assert a.requires_grad and not b.requires_grad and b.grad_fn is None
                assert torch.equal(a.detach(), b), type(module).__name__


def test_a_dispatch_mode_sees_the_ops_called_without_gradients():
    """A TorchDispatchMode sits below autograd, so entering an op below autograd (run_op) keeps it in the call: a
    mode that records, counts (FlopCounterMode) or reroutes (seqkern's TritonOnCPU) still sees every op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func)
            return func(*args, **(kwargs or {}))

    for module, inputs, name in _modules_called_without_gradients():
        with torch.no_grad(), Seen() as seen:
            module(*inputs)
        assert getattr(torch.ops.seqkern, name).default in seen.ops, name
