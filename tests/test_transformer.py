"""seqkern.nn.Transformer* against torch.nn.Transformer* with the same weights: every constructor option and
forward argument, outputs and the gradients of the inputs and every parameter under the correctness rule (the
float64 torch.nn module as the reference, torch.nn in the test's dtype as the yardstick); the stacks and the
full model, torch.nn's nested-tensor padding semantics, state_dict both ways, subclassing, torch.compile and
bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

import seqkern
from helpers import assert_all_rule, case_id

LEN_T, LEN_S, BATCH = 9, 7, 3
LAYERS = ("TransformerEncoderLayer", "TransformerDecoderLayer")

LAYER_OPTIONS = [
    dict(d_model=16, nhead=4, dim_feedforward=32),
    dict(d_model=16, nhead=2, dim_feedforward=24, batch_first=True, norm_first=True, activation="gelu"),
    dict(d_model=24, nhead=3, dim_feedforward=40, activation=torch.tanh, layer_norm_eps=1e-3),
    dict(d_model=16, nhead=4, dim_feedforward=32, bias=False, batch_first=True),
    dict(d_model=16, nhead=2, dim_feedforward=20, norm_first=True, activation=torch.nn.GELU()),
]
# Masks of the self-attention (src/tgt: "mask") and, for the decoder, of the cross-attention ("memory_mask").
FORWARD_CASES = [
    dict(),
    dict(mask="bool", padding="bool"),
    dict(mask="float", padding="float"),
    dict(mask="per_head"),
    dict(mask="causal", is_causal=True),
    dict(padding="bool", memory_padding="bool", memory_mask="bool"),
    dict(memory_mask="causal", memory_is_causal=True, mask="causal", is_causal=True),
    dict(unbatched=True, mask="float"),
    dict(mode="eval"),
    dict(mode="eval", padding="bool"),
]


def _pair(name: str, options: dict, dtype, dropout: float = 0.0):
    """torch.nn's module and seqkern's with the same weights, in `dtype`."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(**options, dropout=dropout)
    ours = getattr(seqkern.nn, name)(**options, dropout=dropout)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


def _sequence(gen, length: int, options: dict, lead: tuple, dtype) -> torch.Tensor:
    width = options["d_model"]
    shape = (length, width) if not lead else (
        (BATCH, length, width) if options.get("batch_first") else (length, BATCH, width))
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()


def _mask(kind: str | None, len_q: int, len_k: int, heads: int, lead: tuple, gen, dtype):
    """A (len_q, len_k) or per-head attention mask; no query row is fully masked (torch.nn gives NaN there)."""
    if kind is None:
        return None
    if kind == "causal":  # top-left aligned, as torch.nn's is_causal hints
        return torch.full((len_q, len_k), float("-inf"), dtype=dtype).triu(1)
    if kind == "bool":
        hidden = torch.rand(len_q, len_k, generator=gen) > 0.7
        hidden[:, 0] = False
        return hidden
    batch = lead[0] if lead else 1
    shape = (batch * heads, len_q, len_k) if kind == "per_head" else (len_q, len_k)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _padding(kind: str | None, length: int, lead: tuple, dtype):
    """A key padding mask hiding the last positions of some sequences (never all of one)."""
    if kind is None:
        return None
    pad = torch.zeros(*lead, length, dtype=torch.bool)
    pad[..., -2:] = True
    if lead:
        pad[0, -4:] = True
        pad[1] = False
    return pad if kind == "bool" else torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, float("-inf"))


def _arguments(name: str, module, options: dict, case: dict, dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    lead = () if case.get("unbatched") else (BATCH,)
    heads = options["nhead"]
    x = _sequence(gen, LEN_T, options, lead, dtype)
    if name == "TransformerEncoderLayer":
        args = dict(src=x, src_mask=_mask(case.get("mask"), LEN_T, LEN_T, heads, lead, gen, dtype),
                    src_key_padding_mask=_padding(case.get("padding"), LEN_T, lead, dtype))
        if "is_causal" in case:
            args["is_causal"] = case["is_causal"]
        return args
    args = dict(tgt=x, memory=_sequence(gen, LEN_S, options, lead, dtype),
                tgt_mask=_mask(case.get("mask"), LEN_T, LEN_T, heads, lead, gen, dtype),
                memory_mask=_mask(case.get("memory_mask"), LEN_T, LEN_S, heads, lead, gen, dtype),
                tgt_key_padding_mask=_padding(case.get("padding"), LEN_T, lead, dtype),
                memory_key_padding_mask=_padding(case.get("memory_padding"), LEN_S, lead, dtype))
    for flag, key in (("is_causal", "tgt_is_causal"), ("memory_is_causal", "memory_is_causal")):
        if flag in case:
            args[key] = case[flag]
    return args


def _run(name: str, module, options: dict, case: dict, dtype) -> dict:
    """The output and, in training mode, the gradients of the inputs and every parameter."""
    args = _arguments(name, module, options, case, dtype)
    if case.get("mode") == "eval":  # torch.nn's native fast path (no gradient)
        module.eval()
        with torch.no_grad():
            return {"output": module(**args)}
    output = module(**args)
    gen = torch.Generator().manual_seed(2)
    loss = (output.double() * torch.randn(output.shape, generator=gen, dtype=torch.float64)).sum()
    leaves = {k: v for k, v in args.items() if k in ("src", "tgt", "memory")}
    leaves.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"output": output, **{f"grad_{n}": g for n, g in zip(leaves, grads)}}


def _check(name: str, options: dict, case: dict, dtype) -> None:
    theirs, ours = _pair(name, options, dtype)
    reference = _pair(name, options, torch.float64)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn's notes on its fast path and mask types
        expected = _run(name, reference, options, case, torch.float64)
        baseline = _run(name, theirs, options, case, dtype)
    with seqkern.backend("cpu"):
        got = _run(name, ours, options, case, dtype)
    assert_all_rule(got, baseline, expected)




def _applies(name: str, case: dict) -> bool:
    """The encoder layer has no memory: cases that differ only in memory masks would repeat others."""
    return name == "TransformerDecoderLayer" or not any(key.startswith("memory") for key in case)


# float32: every forward case with two constructor cases (rotating); float64 and bfloat16 (forward only, as
# torch.nn's bfloat16 backward is not the yardstick here): each constructor case once.
PAIRS = [(torch.float32, n, LAYER_OPTIONS[(i + shift) % len(LAYER_OPTIONS)], c) for n in LAYERS
         for i, c in enumerate(FORWARD_CASES) for shift in (0, 2) if _applies(n, c)]
PAIRS += [(torch.float64, n, o, c) for n in LAYERS for o, c in zip(LAYER_OPTIONS, FORWARD_CASES[3:])
          if _applies(n, c)]
PAIRS += [(torch.bfloat16, n, o, dict(c, mode="eval")) for n in LAYERS for o, c in zip(LAYER_OPTIONS, FORWARD_CASES)
          if _applies(n, c)]


def _option_id(options: dict) -> str:
    return case_id({k: getattr(v, "__name__", type(v).__name__ if callable(v) else v) for k, v in options.items()})


@pytest.mark.parametrize("dtype, name, options, case", PAIRS,
                         ids=[f"{d}-{n}-{_option_id(o)}-{case_id(c)}" for d, n, o, c in PAIRS])
def test_layer_matches_torch_nn(dtype, name, options, case):
    _check(name, options, case, dtype)


# ------------------------------------------------------------------------------------------------------------
# Stacks and the full model.
# ------------------------------------------------------------------------------------------------------------
def _stacks(batch_first: bool, enable_nested_tensor: bool = True, dtype=torch.float32):
    """torch.nn's and seqkern's 2-layer encoders (post-norm, final norm) with the same weights, eval mode."""
    modules = []
    for nn in (torch.nn, seqkern.nn):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modules.append(nn.TransformerEncoder(layer, 2, torch.nn.LayerNorm(16),
                                                 enable_nested_tensor=enable_nested_tensor).to(dtype).eval())
    return modules


@pytest.mark.parametrize("batch_first, nested, right_padded", [(True, True, True), (True, True, False),
                                                               (True, False, True), (False, True, True)])
def test_encoder_padding_matches_torch_nn_everywhere(batch_first, nested, right_padded):
    """In eval without gradients torch.nn runs a right-padded batch as nested tensors (0 at the padded positions,
    hence the final norm's bias there); seqkern returns the same at every position; other conditions: the
    values the layers compute at padded positions, as torch.nn."""
    theirs, ours = _stacks(batch_first, nested)
    x = torch.randn((2, LEN_T, 16) if batch_first else (LEN_T, 2, 16))
    pad = torch.zeros(2, LEN_T, dtype=torch.bool)
    pad[0, -3:] = True
    if not right_padded:
        pad[1, 0] = True
    with torch.no_grad():
        want, got = theirs(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    padded_rows = (got[0, -3:] if batch_first else got[-3:, 0])
    zeroed = batch_first and nested and right_padded  # torch.nn's nested-tensor conditions
    assert torch.allclose(padded_rows, ours.norm.bias.expand_as(padded_rows)) == zeroed


def _models(dtype=torch.float64, **options):
    modules = []
    for nn in (torch.nn, seqkern.nn):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modules.append(nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, **options).to(dtype))
    return modules


def test_transformer_initialization_and_layers():
    theirs, ours = _models(torch.float32)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name
    assert isinstance(ours, torch.nn.Transformer)
    assert isinstance(ours.encoder, seqkern.nn.TransformerEncoder)
    assert isinstance(ours.decoder, seqkern.nn.TransformerDecoder)
    for layer in (*ours.encoder.layers, *ours.decoder.layers):
        assert type(layer).__module__ == "seqkern.nn.transformer"
        assert isinstance(layer.self_attn, seqkern.nn.MultiheadAttention)
    assert isinstance(ours.decoder.layers[0].multihead_attn, seqkern.nn.MultiheadAttention)
    torch.testing.assert_close(ours.generate_square_subsequent_mask(5),
                               torch.nn.Transformer.generate_square_subsequent_mask(5))


@pytest.mark.parametrize("options", [dict(), dict(batch_first=True, norm_first=True, activation="gelu")],
                         ids=case_id)
def test_transformer_matches_torch_nn(options):
    """Every mask of the full model at once, outputs and every gradient (float32 against float64 torch.nn)."""
    reference = _models(torch.float64, **options)[0]
    theirs, ours = _models(torch.float32, **options)
    gen = torch.Generator().manual_seed(3)
    shape = (lambda n: (BATCH, n, 16)) if options.get("batch_first") else (lambda n: (n, BATCH, 16))
    src64, tgt64 = torch.randn(shape(LEN_S), generator=gen, dtype=torch.float64), torch.randn(
        shape(LEN_T), generator=gen, dtype=torch.float64)
    memory_mask = torch.rand(LEN_T, LEN_S, generator=gen) > 0.7
    memory_mask[:, 0] = False
    padding = torch.zeros(BATCH, LEN_S, dtype=torch.bool)
    padding[0, -2:] = True
    cotangent = torch.randn(shape(LEN_T), generator=gen, dtype=torch.float64)

    def run(model, dtype):
        src, tgt = (t.to(dtype).requires_grad_() for t in (src64, tgt64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = model(src, tgt, tgt_mask=model.generate_square_subsequent_mask(LEN_T, dtype=dtype),
                           memory_mask=memory_mask, src_key_padding_mask=padding,
                           memory_key_padding_mask=padding, tgt_is_causal=True)
        leaves = {"src": src, "tgt": tgt, **dict(model.named_parameters())}
        grads = torch.autograd.grad((output.double() * cotangent).sum(), list(leaves.values()))
        return {"output": output, **{f"grad_{n}": g for n, g in zip(leaves, grads)}}

    assert_all_rule(run(ours, torch.float32), run(theirs, torch.float32), run(reference, torch.float64))


def test_custom_encoder_and_decoder_are_used():
    encoder = seqkern.nn.TransformerEncoder(seqkern.nn.TransformerEncoderLayer(16, 2, 32), 1)
    decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(16, 2, 32), 1)
    model = seqkern.nn.Transformer(16, 2, custom_encoder=encoder, custom_decoder=decoder)
    assert model.encoder is encoder and model.decoder is decoder
    assert model(torch.randn(5, 2, 16), torch.randn(4, 2, 16)).shape == (4, 2, 16)


def test_stacks_deep_copy_the_layer():
    layer = seqkern.nn.TransformerDecoderLayer(16, 2, 32)
    stack = seqkern.nn.TransformerDecoder(layer, 3)
    assert len({id(m) for m in stack.layers}) == 3 and all(m is not layer for m in stack.layers)
    assert all(type(m) is seqkern.nn.TransformerDecoderLayer for m in stack.layers)
    with torch.no_grad():
        stack.layers[0].linear1.weight.zero_()
    assert stack.layers[1].linear1.weight.abs().sum() > 0 and layer.linear1.weight.abs().sum() > 0


@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer"])
def test_state_dict_loads_both_ways(name):
    options = dict(d_model=16, nhead=4, dim_feedforward=32, bias=False, dtype=torch.float64)
    if name == "Transformer":
        options.update(num_encoder_layers=2, num_decoder_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = getattr(torch.nn, name)(**options), getattr(seqkern.nn, name)(**options)
        torch.manual_seed(4)
        initialized = getattr(torch.nn, name)(**options).state_dict()
        torch.manual_seed(4)
        same_seed = getattr(seqkern.nn, name)(**options)
    assert isinstance(ours, getattr(torch.nn, name))
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for key, tensor in same_seed.state_dict().items():  # the same random draws as torch.nn's constructor
        assert torch.equal(tensor, initialized[key]), key
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------------------
# Subclassing, fully masked rows, dropout, compile.
# ------------------------------------------------------------------------------------------------------------
def _scaled_feed_forward(cls):
    class Scaled(cls):
        def _ff_block(self, x):
            return 0.5 * super()._ff_block(x)
    return Scaled


def _identity_attention(cls):
    class NoAttention(cls):
        def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
            return x
    return NoAttention


class _LoggedForward(seqkern.nn.TransformerEncoderLayer):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(src, src_mask, src_key_padding_mask, is_causal)


@pytest.mark.parametrize("override", [_scaled_feed_forward, _identity_attention], ids=["ff_block", "sa_block"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_block_overrides_as_torch_nn(override, norm_first):
    """A subclass overriding a block behaves as the same subclass of torch.nn's layer, and an override that
    returns its input (an alias) leaves the caller's tensor untouched."""
    torch.manual_seed(0)
    theirs = override(torch.nn.TransformerEncoderLayer)(16, 4, 32, 0.0, norm_first=norm_first).double()
    ours = override(seqkern.nn.TransformerEncoderLayer)(16, 4, 32, 0.0, norm_first=norm_first).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(LEN_T, 2, 16, dtype=torch.float64)
    before = x.clone()
    torch.testing.assert_close(ours(x), theirs(x))
    assert torch.equal(x, before)


def test_forward_override_and_hooks():
    layer = _LoggedForward(16, 4, 32, 0.0).double()
    stack = seqkern.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    seen = []
    stack.layers[0].self_attn.register_forward_hook(lambda module, args, output: seen.append(output[0].shape))
    reference = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, 0.0), 2,
                                            enable_nested_tensor=False).double()
    reference.load_state_dict(stack.state_dict())
    x = torch.randn(LEN_T, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(stack(x), reference(x))
    assert [m.calls for m in stack.layers] == [1, 1] and seen == [(LEN_T, 2, 16)]


def test_layers_hold_torch_nn_parameters_without_extra_random_draws():
    """MultiheadAttention.from_torch keeps torch.nn's Parameter objects; the generator ends where torch.nn's does."""
    torch.manual_seed(0)
    theirs, after_theirs = torch.nn.TransformerDecoderLayer(8, 2, 16), torch.rand(3)
    torch.manual_seed(0)
    ours, after_ours = seqkern.nn.TransformerDecoderLayer(8, 2, 16), torch.rand(3)
    assert torch.equal(after_theirs, after_ours)
    assert type(ours.self_attn) is type(ours.multihead_attn) is seqkern.nn.MultiheadAttention
    for (name, a), (other, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert name == other and torch.equal(a, b)
    attn = torch.nn.MultiheadAttention(6, 2, kdim=4, add_bias_kv=True).eval()
    converted = seqkern.nn.MultiheadAttention.from_torch(attn)
    assert not converted.training
    assert all(a is b for a, b in zip(attn.parameters(), converted.parameters()))


# (MultiheadAttention options, kind of call): the packed fast path and the configurations that fall back to forward
ATTEND_CASES = [
    (dict(), "self"), (dict(batch_first=True), "self"), (dict(), "cross"), (dict(batch_first=True), "unbatched"),
    (dict(kdim=5, vdim=5), "cross"), (dict(add_zero_attn=True), "self"), (dict(add_bias_kv=True), "cross"),
]


@pytest.mark.parametrize("options,kind", ATTEND_CASES, ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_attend_is_forward_without_weights(options, kind):
    """MultiheadAttention.attend, the layers' public entry, returns forward(..., need_weights=False)[0]."""
    torch.manual_seed(0)
    attn = seqkern.nn.MultiheadAttention(6, 2, **options).double()
    width = options.get("kdim", 6)
    batch_dims = (2, 3) if options.get("batch_first") else (3, 2)  # (B, L) or (L, B)
    query = torch.randn(*batch_dims, 6, dtype=torch.float64)
    memory = torch.randn(4, 2, width, dtype=torch.float64)
    if options.get("batch_first"):
        memory = memory.transpose(0, 1)
    mask = torch.tensor([[False, True, False, False]] * 3)
    if kind == "self":
        memory, mask = query, None
    elif kind == "unbatched":
        query, memory = query[0], memory[0]
    got = attn.attend(query, memory, attn_mask=mask)
    torch.testing.assert_close(got, attn(query, memory, memory, attn_mask=mask, need_weights=False)[0])


def test_fully_masked_query_gives_zero_attention_instead_of_nan():
    layer = seqkern.nn.TransformerEncoderLayer(8, 2, 16, 0.0, norm_first=True)
    x = torch.randn(4, 1, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1] = True
    output = layer(x, src_mask=mask)
    assert torch.isfinite(output).all()
    ff = layer._ff_block(layer.norm2(x[1]))  # row 1: attention contributes 0
    torch.testing.assert_close(output[1], x[1] + ff)


def test_dropout_in_training_only():
    layer = seqkern.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.5, batch_first=True)
    x = torch.randn(2, LEN_T, 16)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), first)  # reproducible from the seed
    assert not torch.allclose(layer(x), first)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def _pass_through_blocks(cls):
    """Overrides that call the originals: the layer then no longer owns its block outputs (no in-place adds)."""
    class PassThrough(cls):
        def _sa_block(self, *args, **kwargs):
            return super()._sa_block(*args, **kwargs)

        def _ff_block(self, x):
            return super()._ff_block(x)
    return PassThrough


@pytest.mark.parametrize("norm_first", [False, True])
def test_in_place_residuals_keep_outputs_and_gradients_under_dropout(norm_first):
    """With dropout the residual adds run in place on the dropout outputs; the same layer without them (a
    pass-through subclass), drawing the same masks, gives the same output and gradients."""
    modules = []
    for cls in (seqkern.nn.TransformerEncoderLayer, _pass_through_blocks(seqkern.nn.TransformerEncoderLayer)):
        torch.manual_seed(0)
        modules.append(cls(16, 4, 32, dropout=0.3, norm_first=norm_first).double())
    x = torch.randn(LEN_T, 2, 16, dtype=torch.float64)
    results = []
    for module in modules:
        leaf = x.clone().requires_grad_()
        torch.manual_seed(7)
        output = module(leaf)
        results.append([output, *torch.autograd.grad(output.sum(), [leaf, *module.parameters()])])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Training (gradients) and eval without autograd (the in-place paths: heads copied into the q slot,
    in-place GELU and residuals)."""
    torch._dynamo.reset()
    layer = seqkern.nn.TransformerEncoderLayer(16, 4, 32, 0.0, activation="gelu", batch_first=True)
    x = torch.randn(2, LEN_T, 16, requires_grad=True)
    pad = torch.zeros(2, LEN_T, dtype=torch.bool)
    pad[0, -3:] = True
    compiled = torch.compile(layer, fullgraph=True)
    got, want = compiled(x, src_key_padding_mask=pad), layer(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, src_key_padding_mask=pad), layer(x, src_key_padding_mask=pad))


@pytest.mark.parametrize("tgt_shape, memory_shape", [((0, 5, 16), (0, 4, 16)), ((3, 0, 16), (3, 4, 16)),
                                                      ((3, 5, 16), (3, 0, 16))])
def test_empty_batches_and_sequences(tgt_shape, memory_shape):
    """Empty results of the right shape, and gradients of the right shape (an empty memory: attention 0)."""
    encoder = seqkern.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    decoder = seqkern.nn.TransformerDecoderLayer(16, 4, 32, batch_first=True)
    tgt, memory = torch.randn(tgt_shape, requires_grad=True), torch.randn(memory_shape, requires_grad=True)
    out = decoder(encoder(tgt), memory)
    assert out.shape == tgt_shape and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (tgt, memory), allow_unused=True)
    assert grads[0].shape == tgt_shape


# ------------------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------------------
def _encoder(**changes):
    layer = seqkern.nn.TransformerEncoderLayer(16, 4, 32)
    args = {"src": torch.randn(5, 2, 16), **changes}
    return lambda: layer(**args)


def _decoder(**changes):
    layer = seqkern.nn.TransformerDecoderLayer(16, 4, 32)
    args = {"tgt": torch.randn(5, 2, 16), "memory": torch.randn(7, 2, 16), **changes}
    return lambda: layer(**args)


def _model(**changes):
    model = seqkern.nn.Transformer(16, 4, 1, 1, 32)
    args = {"src": torch.randn(7, 2, 16), "tgt": torch.randn(5, 2, 16), **changes}
    return lambda: model(**args)


BAD = [
    ("src width", _encoder(src=torch.randn(5, 2, 15)), ValueError, "src: expected 16 features"),
    ("src 4-D", _encoder(src=torch.randn(1, 5, 2, 16)), ValueError, "src: expected a 2-D"),
    ("src dtype", _encoder(src=torch.randn(5, 2, 16, dtype=torch.float64)), TypeError, "src: expected torch.float32"),
    ("src not a tensor", _encoder(src=[[0.0] * 16]), TypeError, "src: expected a torch.Tensor"),
    ("src_mask shape", _encoder(src_mask=torch.zeros(5, 6)), ValueError, "attn_mask: expected shape"),
    ("src_mask dtype", _encoder(src_mask=torch.zeros(5, 5, dtype=torch.int64)), TypeError, "attn_mask"),
    ("padding shape", _encoder(src_key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError,
     "key_padding_mask: expected shape"),
    ("is_causal without mask", _encoder(is_causal=True), ValueError, "is_causal"),
    ("memory width", _decoder(memory=torch.randn(7, 2, 8)), ValueError, "memory: expected 16 features"),
    ("memory batch", _decoder(memory=torch.randn(7, 3, 16)), ValueError, "batch 2"),
    ("memory dims", _decoder(memory=torch.randn(7, 16)), ValueError, "memory: expected 3 dims"),
    ("memory_mask shape", _decoder(memory_mask=torch.zeros(5, 5)), ValueError, "attn_mask: expected shape"),
    ("tgt_key_padding_mask dtype", _decoder(tgt_key_padding_mask=torch.zeros(2, 5, dtype=torch.int32)), TypeError,
     "key_padding_mask"),
    ("model batch", _model(tgt=torch.randn(5, 3, 16)), ValueError, "tgt: expected batch 2"),
    ("model width", _model(src=torch.randn(7, 2, 8)), ValueError, "src: expected 16 features"),
]


@pytest.mark.parametrize("name, call, error, words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call()
