"""The LayerNorm LSTM (issue 16): the op (C++ and Triton under the interpreter) and seqkern.nn.LayerNormLSTM under the
correctness rule against the definition composed HERE in float64 (torch.nn.functional.layer_norm, the gates, the
updates, zoneout, lengths and resets in the test's own loop), every output, state and parameter gradient; gradcheck,
double backward, opcheck, torch.compile, NaN/Inf, bad input. tests/test_layernorm_gru.py reuses the loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from helpers import assert_all_rule, case_id, check_op, gradcheck_op
from seqkern.reference.flash_attention import dropout_bits

OPS = torch.ops.seqkern


# ------------------------------------------------------------------------------------------------
# The definition, composed in the test (issue 16 item 1 and 2, seqkern/reference/_scan.py's option semantics).
# ------------------------------------------------------------------------------------------------
def zoneout_keep(seed, state_index, t, batch, width, p):
    """(B, width) bool: the training mask of state `state_index` at time t, from the counter-based bits."""
    j = torch.arange(batch)[:, None] * width + torch.arange(width)
    return dropout_bits(seed, state_index, torch.tensor(t), j) < int(p * 2**32)


def composed_scan(cell, x, states0, lengths=None, resets=None, zoneout=0.0, seed=None, reverse=False):
    """The layer loop: cell(x_t, states) -> new states (the first is h, the output). Returns output, *finals.
    Row b is active at t < lengths[b] (inactive: state kept, output 0); resets[t, b] puts the initial states back
    before step t; zoneout keeps (training: masks) or blends (evaluation) each state with its previous value."""
    seq_len, batch = x.shape[:2]
    states, outputs = states0, [None] * seq_len
    for t in (range(seq_len - 1, -1, -1) if reverse else range(seq_len)):
        if resets is not None:
            states = tuple(torch.where(resets[t][:, None], s0, s) for s0, s in zip(states0, states))
        new = cell(x[t], states)
        if zoneout:
            if seed is None:
                new = tuple(zoneout * s + (1 - zoneout) * n for s, n in zip(states, new))
            else:
                new = tuple(torch.where(zoneout_keep(seed, k, t, batch, n.shape[1], zoneout), s, n)
                            for k, (s, n) in enumerate(zip(states, new)))
        active = torch.ones(batch, 1, dtype=torch.bool) if lengths is None else (lengths > t)[:, None]
        states = tuple(torch.where(active, n, s) for n, s in zip(new, states))
        outputs[t] = torch.where(active, new[0], torch.zeros_like(new[0]))
    return (torch.stack(outputs), *states)


def composed_layernorm_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
                            eps, lengths, resets, zoneout, seed, reverse):
    """(output, h_n, c_n) of one layer from issue 16's equations."""
    gates = w_ih.shape[0]

    def cell(x_t, states):
        h, c = states
        pre = (F.layer_norm(x_t @ w_ih.t(), (gates,), ln_ih_w, ln_ih_b, eps)
               + F.layer_norm(h @ w_hh.t(), (gates,), ln_hh_w, ln_hh_b, eps))
        if b_ih is not None:
            pre = pre + b_ih + b_hh
        i, f, g, o = pre.chunk(4, dim=-1)
        c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * F.layer_norm(c_new, (c_new.shape[1],), ln_c_w, ln_c_b, eps).tanh(), c_new

    return composed_scan(cell, x, (h0, c0), lengths, resets, zoneout, seed, reverse)


# ------------------------------------------------------------------------------------------------
# Arguments.
# ------------------------------------------------------------------------------------------------
TENSOR_NAMES = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_weight", "ln_ih_bias", "ln_hh_weight",
                "ln_hh_bias", "ln_cell_weight", "ln_cell_bias")


def random_layer_args(gates, cell_state, seq_len, batch, input_size, hidden, *, bias=True, lengths=None,
                      resets=False, zoneout=0.0, train=False, reverse=False, scale=1.0, eps=1e-5, seed=0):
    """Float64 arguments of a layernorm op (without save_workspace): LayerNorm weights around 1, biases around 0."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s * scale + mean

    g = gates * hidden
    w = hidden ** -0.5
    states = (rand(batch, hidden),) + ((rand(batch, hidden),) if cell_state else ())
    params = [rand(g, input_size, s=w), rand(g, hidden, s=w)]
    params += [rand(g, s=w), rand(g, s=w)] if bias else [None, None]
    params += [rand(g, s=0.3, mean=1.0), rand(g, s=0.3), rand(g, s=0.3, mean=1.0), rand(g, s=0.3)]
    if cell_state:
        params += [rand(hidden, s=0.3, mean=1.0), rand(hidden, s=0.3)]
    reset_mask = torch.rand(seq_len, batch, generator=gen) < 0.3 if resets else None
    seed_t = torch.tensor(1234 + seed, dtype=torch.int64) if train else None
    lengths_t = torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None
    return (rand(seq_len, batch, input_size), *states, *params, eps, lengths_t, reset_mask, zoneout, seed_t, reverse)


def layer_args(*sizes, **options):
    return random_layer_args(4, True, *sizes, **options)


def op_forward(*args):
    return OPS.layernorm_lstm_forward(*args, True)[:3]


CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=7, batch=3, input_size=5, hidden=63),
    dict(seq_len=9, batch=5, input_size=4, hidden=127, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, bias=False, lengths=[4, 6, 1, 4]),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, lengths=[2, 6, 5, 1], reverse=True),
    dict(seq_len=8, batch=5, input_size=3, hidden=19, resets=True, zoneout=0.3, train=True),
    dict(seq_len=7, batch=3, input_size=6, hidden=33, zoneout=0.25, lengths=[7, 3, 5], reverse=True),
    dict(seq_len=6, batch=4, input_size=5, hidden=20, resets=True, lengths=[6, 2, 5, 3], zoneout=1.0, train=True),
    dict(seq_len=5, batch=3, input_size=4, hidden=16, scale=8.0),  # large magnitudes: saturated gates
]
# The large shape runs in float32 and bfloat16 only (its float64 run adds time, not coverage).
LARGE_CASE = dict(seq_len=20, batch=32, input_size=33, hidden=256)


def _dtype_cases():
    for i, case in enumerate(CASES):
        for dtype in (torch.float32, torch.float64) + ((torch.bfloat16,) if i in (1, 5) else ()):
            yield case, dtype
    yield LARGE_CASE, torch.float32
    yield LARGE_CASE, torch.bfloat16


@pytest.mark.parametrize("case,dtype", list(_dtype_cases()), ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_cpu_kernel_against_composed(case, dtype):
    check_op(op_forward, composed_layernorm_lstm, layer_args(**case), TENSOR_NAMES, dtype, "cpu")


def test_gradcheck_with_every_option():
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in layer_args(5, 3, 2, 4, lengths=[5, 2, 4], resets=True, zoneout=0.4, train=True)]
    with seqkern.backend("cpu"):
        assert gradcheck_op(op_forward, args)
    args[-2] = None  # evaluation blend, reverse, no resets
    args[-4], args[-1] = None, True
    with seqkern.backend("cpu"):
        assert gradcheck_op(op_forward, args)


def test_double_backward_goes_through_the_reference():
    # A few of the inputs (gradgradcheck's cost grows with their number; the mechanism is the same for all).
    wanted = {"input", "h0", "w_hh", "ln_hh_weight", "ln_cell_bias"}
    args = [a.requires_grad_() if i < len(TENSOR_NAMES) and TENSOR_NAMES[i] in wanted else a
            for i, a in enumerate(layer_args(2, 2, 2, 3, lengths=[2, 1], zoneout=0.2))]
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return op_forward(*full)

    with seqkern.backend("cpu"):
        assert torch.autograd.gradgradcheck(run, [args[i] for i in positions], fast_mode=True)


def test_inference_returns_no_workspace_and_the_same_values():
    args = layer_args(5, 3, 4, 6, lengths=[5, 3, 1])
    args32 = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with seqkern.backend("cpu"):
        *values, workspace = OPS.layernorm_lstm_forward(*args32, False)
        *saved, _ = OPS.layernorm_lstm_forward(*args32, True)
    assert workspace.numel() == 0
    for got, want in zip(values, saved):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["input", "h0"])
def test_nan_and_inf_propagate_as_torch(where):
    args = list(layer_args(4, 3, 3, 5, lengths=[4, 2, 3]))
    index = TENSOR_NAMES.index(where)
    args[index] = args[index].clone()
    args[index][0, 1] = float("nan")
    args[index][0, 2] = float("inf")
    args32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    want = composed_layernorm_lstm(*args32)
    with seqkern.backend("cpu"):
        got = op_forward(*args32)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())


def _opcheck_cases():
    for requires_grad, case in ((True, CASES[5]), (True, CASES[6]), (False, CASES[3])):
        args = [a.float().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in layer_args(**case)]
        yield OPS.layernorm_lstm_forward.default, (*args, requires_grad)
    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in layer_args(5, 3, 4, 6, lengths=[5, 3, 1], resets=True, zoneout=0.5, train=True)]
    output, h_n, c_n, workspace = OPS.layernorm_lstm_forward(*args, True)
    (x, h0, c0, w_ih, w_hh, _, _, ln_ih_w, _, ln_hh_w, _, ln_c_w, ln_c_b, _, lengths, resets, zoneout, seed,
     reverse) = args
    yield OPS.layernorm_lstm_backward.default, (
        torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, h0, c0, w_ih, w_hh, ln_ih_w,
        ln_hh_w, ln_c_w, ln_c_b, output, workspace, lengths, resets, zoneout, seed, reverse)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_bad_op_arguments_are_refused_before_the_kernel():
    args = list(layer_args(4, 2, 3, 5, lengths=[4, 2]))
    bad_lengths = list(args)
    bad_lengths[-5] = torch.tensor([5, 2])
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match="lengths"):
        OPS.layernorm_lstm_forward(*bad_lengths, False)
    reverse_resets = list(args)
    reverse_resets[-4], reverse_resets[-1] = torch.zeros(4, 2, dtype=torch.bool), True
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match="reverse"):
        OPS.layernorm_lstm_forward(*reverse_resets, False)
    bad_zoneout = list(args)
    bad_zoneout[-3] = 1.5
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match="zoneout"):
        OPS.layernorm_lstm_forward(*bad_zoneout, False)


# ------------------------------------------------------------------------------------------------
# The module.
# ------------------------------------------------------------------------------------------------
def composed_module(module, composed_layer, x, hx, lengths=None, resets=None, seeds=None):
    """A LayerNorm LSTM/GRU module's (output, finals) from `composed_layer` on its own parameters, time-major x."""
    directions = 2 if module.bidirectional else 1
    names = module._flat_weights_names
    per = len(names) // (module.num_layers * directions)
    finals, layer_input = [], x
    for layer in range(module.num_layers):
        outs = []
        for d in range(directions):
            index = layer * directions + d
            params = {n.rsplit("_l", 1)[0]: getattr(module, n) for n in names[index * per:(index + 1) * per]}
            ordered = [params["weight_ih"], params["weight_hh"], params.get("bias_ih"), params.get("bias_hh"),
                       params["ln_ih_weight"], params["ln_ih_bias"], params["ln_hh_weight"], params["ln_hh_bias"]]
            if "ln_cell_weight" in params:
                ordered += [params["ln_cell_weight"], params["ln_cell_bias"]]
            seed = None if seeds is None else seeds[index]
            out, *final = composed_layer(layer_input, *(h[index] for h in hx), *ordered, module.eps, lengths,
                                         resets, module.zoneout, seed, d == 1)
            outs.append(out)
            finals.append(final)
        layer_input = torch.cat(outs, -1) if directions == 2 else outs[0]
    return layer_input, [torch.stack(parts) for parts in zip(*finals)]


MODULE_OPTIONS = [
    dict(input_size=5, hidden_size=7),
    dict(input_size=3, hidden_size=33, num_layers=2, bias=False, batch_first=True, bidirectional=True),
    dict(input_size=4, hidden_size=9, zoneout=0.3, eps=1e-3),
]


def run_module(module, owner, x, hx, lengths, resets, cotangent_seed=3):
    """Outputs, final states and every gradient (input, hx, owner's parameters) of a weighted sum of the outputs."""
    x = x.detach().requires_grad_()
    hx = tuple(h.detach().requires_grad_() for h in hx)
    out, final = module(x, hx if len(hx) > 1 else hx[0], lengths=lengths, resets=resets)
    finals = final if isinstance(final, tuple) else (final,)
    results = {"output": out, **{f"state{i}": s for i, s in enumerate(finals)}}
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((r.double() * torch.randn(r.shape, generator=gen, dtype=torch.float64)).sum() for r in results.values())
    grads = torch.autograd.grad(loss, [x, *hx, *owner.parameters()])
    names = ["input", *(f"h{i}" for i in range(len(hx))), *(n for n, _ in owner.named_parameters())]
    results.update({f"grad_{n}": g for n, g in zip(names, grads)})
    return results


class Composed:
    """The composed definition as a callable over `source`'s parameters (eval-mode zoneout: the blend)."""

    def __init__(self, source, composed_layer):
        self.source, self.composed_layer = source, composed_layer

    def __call__(self, x, hx, lengths=None, resets=None):
        batch_first = self.source.batch_first
        xt = x.transpose(0, 1) if batch_first else x
        rt = None if resets is None else (resets.t() if batch_first else resets)
        hx = hx if isinstance(hx, tuple) else (hx,)
        out, finals = composed_module(self.source, self.composed_layer, xt, hx, lengths, rt)
        out = out.transpose(0, 1) if batch_first else out
        return out, (tuple(finals) if len(finals) > 1 else finals[0])


def check_module_against_composed(module_cls, composed_layer, states, options, dtype, *, lengths=None, resets=False):
    torch.manual_seed(0)
    ours = module_cls(**options).double().eval()
    with torch.no_grad():  # LayerNorm parameters away from their 1 / 0 initialization
        for name, p in ours.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.2 * torch.randn_like(p))
    seq_len, batch = 6, 4
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    gen = torch.Generator().manual_seed(1)
    shape = (batch, seq_len, options["input_size"]) if options.get("batch_first") else (seq_len, batch, options["input_size"])
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(layers, batch, options["hidden_size"], generator=gen, dtype=torch.float64)
               for _ in range(states))
    lengths_t = torch.tensor(lengths) if lengths is not None else None
    reset_mask = None
    if resets:
        reset_mask = torch.rand(shape[:2], generator=gen) < 0.3
    results = {}
    for key, dt in (("ours", dtype), ("theirs", dtype), ("ref", torch.float64)):
        ours.to(dt)
        module = ours if key == "ours" else Composed(ours, composed_layer)
        with seqkern.backend("cpu"):
            results[key] = run_module(module, ours, x.to(dt), tuple(h.to(dt) for h in hx), lengths_t, reset_mask)
    assert_all_rule(results["ours"], results["theirs"], results["ref"])


@pytest.mark.parametrize("options,dtype", [(MODULE_OPTIONS[0], torch.float64)] + [(o, torch.float32) for o in MODULE_OPTIONS],
                         ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_module_against_composed(options, dtype):
    check_module_against_composed(seqkern.nn.LayerNormLSTM, composed_layernorm_lstm, 2, options, dtype)


def test_module_lengths_and_resets_against_composed():
    check_module_against_composed(seqkern.nn.LayerNormLSTM, composed_layernorm_lstm, 2,
                                  dict(input_size=3, hidden_size=10, num_layers=2, batch_first=True),
                                  torch.float32, lengths=[6, 2, 5, 1], resets=True)


def check_lengths_match_packing(module):
    """lengths (any order) == the module on pack_padded_sequence(enforce_sorted=False), padded back; gradients too."""
    torch.manual_seed(2)
    x = torch.randn(7, 4, module.input_size, requires_grad=True)
    lengths = torch.tensor([3, 7, 1, 5])
    out, final = module(x, lengths=lengths)
    packed_out, packed_final = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, _ = pad_packed_sequence(packed_out, total_length=7)
    finals = final if isinstance(final, tuple) else (final,)
    packed_finals = packed_final if isinstance(packed_final, tuple) else (packed_final,)
    torch.testing.assert_close(out, padded)
    for a, b in zip(finals, packed_finals):
        torch.testing.assert_close(a, b)
    assert out[lengths[0]:, 0].abs().max() == 0
    g1 = torch.autograd.grad(out.sum() + sum(f.sum() for f in finals), x)[0]
    g2 = torch.autograd.grad(padded.sum() + sum(f.sum() for f in packed_finals), x)[0]
    torch.testing.assert_close(g1, g2)


def test_lengths_match_packed_sequence():
    with seqkern.backend("cpu"):
        check_lengths_match_packing(seqkern.nn.LayerNormLSTM(3, 8, num_layers=2, bidirectional=True))


def test_zoneout_reproducible_training_and_blended_eval():
    module = seqkern.nn.LayerNormLSTM(3, 6, zoneout=0.5)
    x = torch.randn(5, 2, 3)
    with seqkern.backend("cpu"):
        torch.manual_seed(11)
        a = module(x)[0]
        torch.manual_seed(11)
        b = module(x)[0]
        c = module(x)[0]
        module.eval()
        e1, e2 = module(x)[0], module(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    # Training masks from the module's seed: the composed definition with that seed gives the same output.
    torch.manual_seed(11)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    module.train()
    want, _ = composed_module(module, composed_layernorm_lstm, x, (torch.zeros(1, 2, 6),) * 2, seeds=[seed])
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)


def test_unbatched_hx_and_dropout():
    module = seqkern.nn.LayerNormLSTM(3, 5, num_layers=2, dropout=0.5)
    x = torch.randn(4, 3)
    with seqkern.backend("cpu"):
        out, (h, c) = module(x, (torch.zeros(2, 5), torch.zeros(2, 5)), lengths=torch.tensor(3),
                             resets=torch.tensor([False, False, True, False]))
        batched, _ = module(x[:, None], lengths=torch.tensor([3]), resets=torch.tensor([[False], [False], [True], [False]]))
    assert out.shape == (4, 5) and h.shape == (2, 5) and c.shape == (2, 5)
    module.eval()
    with seqkern.backend("cpu"):
        torch.testing.assert_close(module(x)[0], module(x[:, None])[0][:, 0])


@pytest.mark.parametrize("call,error,match", [
    (lambda m, x: m(x, lengths=torch.tensor([2.0, 3.0])), TypeError, "lengths"),
    (lambda m, x: m(x, lengths=torch.tensor([2, 9])), ValueError, "lengths"),
    (lambda m, x: m(x, lengths=torch.tensor([0, 3])), ValueError, "lengths"),
    (lambda m, x: m(x, lengths=torch.tensor([2, 3, 1])), ValueError, "lengths"),
    (lambda m, x: m(x, resets=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "resets"),
    (lambda m, x: m(x, resets=torch.zeros(4, 2)), TypeError, "resets"),
    (lambda m, x: m(x, torch.zeros(1, 2, 5)), ValueError, "tuple"),
    (lambda m, x: m(x, (torch.zeros(1, 3, 5), torch.zeros(1, 2, 5))), ValueError, "hx"),
    (lambda m, x: m(x.double()), ValueError, "dtype"),
])
def test_bad_module_input(call, error, match):
    module = seqkern.nn.LayerNormLSTM(3, 5)
    with pytest.raises(error, match=match):
        call(module, torch.randn(4, 2, 3))


def test_bad_constructor_arguments_and_bidirectional_resets():
    for kwargs in (dict(zoneout=1.5), dict(zoneout=-0.1), dict(dropout=2.0), dict(eps=0.0)):
        with pytest.raises(ValueError):
            seqkern.nn.LayerNormLSTM(3, 5, **kwargs)
    with pytest.raises(ValueError, match="bidirectional"):
        seqkern.nn.LayerNormLSTM(3, 5, bidirectional=True)(torch.randn(4, 2, 3), resets=torch.zeros(4, 2, dtype=torch.bool))


def test_parameters_as_the_issue_names_them():
    module = seqkern.nn.LayerNormLSTM(3, 5, bidirectional=True)
    names = [n for n, _ in module.named_parameters()]
    assert names[:10] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "ln_ih_weight_l0",
                          "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0", "ln_cell_weight_l0", "ln_cell_bias_l0"]
    assert "ln_cell_bias_l0_reverse" in names
    assert torch.equal(module.ln_ih_weight_l0, torch.ones(20)) and torch.equal(module.ln_cell_bias_l0, torch.zeros(5))
    assert seqkern.nn.LayerNormLSTM(3, 5, bias=False).weight_ih_l0.shape == (20, 3)
    assert not hasattr(seqkern.nn.LayerNormLSTM(3, 5, bias=False), "bias_ih_l0")


@pytest.mark.slow
def test_torch_compile_fullgraph_with_lengths():
    module = seqkern.nn.LayerNormLSTM(4, 6, num_layers=2, batch_first=True)
    x, lengths = torch.randn(3, 5, 4), torch.tensor([5, 2, 4])
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with seqkern.backend("cpu"):
        got, (h, c) = compiled(x, lengths=lengths)
        want, (wh, wc) = module(x, lengths=lengths)
    for a, b in ((got, want), (h, wh), (c, wc)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# Triton, under the interpreter on CPU tensors (small shapes).
# ------------------------------------------------------------------------------------------------
TRITON_CASES = [CASES[0], dict(seq_len=4, batch=3, input_size=5, hidden=17), CASES[3], CASES[5],
                dict(seq_len=4, batch=3, input_size=3, hidden=9, zoneout=0.25, lengths=[2, 4, 3], reverse=True)]


@pytest.mark.triton
@pytest.mark.parametrize("case,dtype", [(c, torch.float64) for c in TRITON_CASES]
                         + [(TRITON_CASES[1], torch.float32), (TRITON_CASES[3], torch.float32)],
                         ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_triton_kernel_against_composed(case, dtype):
    check_op(op_forward, composed_layernorm_lstm, layer_args(**case), TENSOR_NAMES, dtype, "triton")


# The split forward (kernels/_layernorm_split.py: hidden units split across programs, the LayerNorms' row statistics
# merged across them), forced: 40 units in 16-unit slices = 3 programs per batch block, the last one partial; 18 rows
# = 2 batch blocks. The backward is the row-block kernel's, from the split forward's workspace, so every gradient
# checks the workspace too.
SPLIT_CASES = [
    dict(seq_len=4, batch=18, input_size=5, hidden=40, resets=True, zoneout=0.3, train=True,
         lengths=[4, 3, 2, 1, 0, 4] * 3),
    dict(seq_len=4, batch=3, input_size=4, hidden=33, zoneout=0.25, lengths=[2, 4, 3], reverse=True),
]
SPLIT_DTYPE_CASES = [(SPLIT_CASES[0], torch.float64), (SPLIT_CASES[0], torch.float32),
                     (SPLIT_CASES[1], torch.float32), (SPLIT_CASES[1], torch.bfloat16)]


def check_split_kernels(op, oracle, args, names, dtype, monkeypatch, mode=("per_step", 16)) -> None:
    """check_op with the split kernels forced (mode, BLOCK_U) and spies proving that the split forward and backward
    ran (every output and gradient is theirs)."""
    from seqkern.kernels import _layernorm_split
    from seqkern.kernels._recurrent import forced_mode

    calls = []
    for name in ("split_forward", "split_backward"):
        original = getattr(_layernorm_split, name)
        monkeypatch.setattr(_layernorm_split, name,
                            lambda *a, _name=name, _original=original, **k: calls.append(_name) or _original(*a, **k))
    with forced_mode(*mode):
        check_op(op, oracle, args, names, dtype, "triton")
    assert set(calls) == {"split_forward", "split_backward"}, calls


@pytest.mark.triton
@pytest.mark.parametrize("case,dtype", SPLIT_DTYPE_CASES,
                         ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_triton_split_kernels_against_composed(case, dtype, monkeypatch):
    check_split_kernels(op_forward, composed_layernorm_lstm, layer_args(**case), TENSOR_NAMES, dtype, monkeypatch)


@pytest.mark.triton
def test_triton_split_kernels_persistent(monkeypatch):
    """The persistent mode (one launch, the grid barrier after each phase) with one program per batch block (the
    interpreter runs programs one after another): the phase loop and the barrier's counter."""
    check_split_kernels(op_forward, composed_layernorm_lstm, layer_args(**SPLIT_CASES[1]), TENSOR_NAMES,
                        torch.float32, monkeypatch, mode=("persistent", 64))


@pytest.mark.triton
def test_triton_split_rule():
    """The rule (kernels/_layernorm_split.py layernorm_mode): the row-block kernel without a GPU and at padded
    hidden <= 64; above it the split forward, persistent while its programs fit one per SM, else per step
    (tests/test_gpu_compile.py proves the picks compile clean). Forced modes; the interpreter refuses a persistent
    launch of several programs per batch block."""
    from seqkern.kernels._layernorm_split import SPLIT_TILE, layernorm_mode
    from seqkern.kernels._recurrent import forced_mode

    assert layernorm_mode(1, 1024, 0) == {"mode": "rows"}
    assert layernorm_mode(1, 64, 132) == {"mode": "rows"}
    assert layernorm_mode(1, 65, 132) == {"mode": "persistent", **SPLIT_TILE}
    assert layernorm_mode(64, 1024, 132) == {"mode": "persistent", **SPLIT_TILE}  # 4 x 32 programs
    assert layernorm_mode(80, 1024, 132) == {"mode": "per_step", **SPLIT_TILE}  # 5 x 32
    with forced_mode("rows"):
        assert layernorm_mode(1, 1024, 132)["mode"] == "rows"
    with forced_mode("per_step", block_u=16, block_b=32):
        mode = layernorm_mode(1, 8, 0)
        assert (mode["mode"], mode["BLOCK_U"], mode["BLOCK_B"]) == ("per_step", 16, 32)
    args = layer_args(**SPLIT_CASES[1])
    with forced_mode("persistent", block_u=16), seqkern.backend("triton"):
        with pytest.raises(ValueError, match="one program per batch block"):
            op_forward(*args)
