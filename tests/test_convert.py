"""seqkern.convert: every supported layer replaced, the rest left alone with a reason, the converted model
equal to the original within the correctness rule (outputs and every parameter's gradient)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import seqkern
from helpers import assert_rule

VOCAB, WIDTH, HEADS = 11, 8, 2


class CustomGRU(nn.GRU):
    """A user's subclass: it may override forward, so convert leaves it alone."""


class Orthogonal(nn.Module):
    def forward(self, weight):
        return torch.linalg.qr(weight)[0] if weight.shape[0] >= weight.shape[1] else weight


class Mixed(nn.Module):
    """Every layer convert knows, plus some it does not (Embedding, Conv1d, Linear, a subclass, a parametrized
    LSTM) and a module shared by two parents."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.lstm = nn.LSTM(WIDTH, WIDTH, num_layers=2, batch_first=True, bidirectional=True, proj_size=WIDTH // 2)
        self.gru = nn.GRU(WIDTH, WIDTH)
        self.rnn = nn.RNN(WIDTH, WIDTH, nonlinearity="relu", batch_first=True)
        self.lstm_cell, self.gru_cell = nn.LSTMCell(WIDTH, WIDTH), nn.GRUCell(WIDTH, WIDTH, bias=False)
        self.rnn_cell = nn.RNNCell(WIDTH, WIDTH)
        self.same_cell = self.rnn_cell
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True, add_bias_kv=True)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 16, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(WIDTH), enable_nested_tensor=False)
        self.decoder_layer = nn.TransformerDecoderLayer(WIDTH, HEADS, 16, dropout=0.0, batch_first=True,
                                                        norm_first=True)
        self.transformer = nn.Transformer(WIDTH, HEADS, 1, 1, 16, dropout=0.0, batch_first=True)
        self.custom = CustomGRU(WIDTH, WIDTH, batch_first=True)
        self.parametrized = nn.LSTM(WIDTH, WIDTH, batch_first=True)
        parametrize.register_parametrization(self.parametrized, "weight_hh_l0", Orthogonal())
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)                                     # (B, T, W)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x, _ = self.lstm(x)
        x, _ = self.gru(x.transpose(0, 1))
        x, _ = self.rnn(x.transpose(0, 1))
        h, c = self.lstm_cell(x[:, 0])
        h = self.gru_cell(h, c) + self.same_cell(h)
        x = x + h.unsqueeze(1)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = self.encoder(x, is_causal=True, mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]))
        x = self.decoder_layer(x, x)
        x = self.transformer(x, x)
        x, _ = self.custom(x)
        x, _ = self.parametrized(x)
        return self.head(x)


def _outputs_and_grads(model: nn.Module, tokens: torch.Tensor, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(tokens)
    (out * cotangent.to(out.dtype)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {"output": out.detach(), **grads}


@pytest.fixture
def mixed():
    """A fresh model per test: after a forward, nn.LSTM caches its parametrized weight (a non-leaf tensor), and
    deepcopy refuses such a model (torch's own limitation)."""
    torch.manual_seed(0)
    return Mixed()


def test_converted_model_matches_the_original(mixed):
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 7))
    cotangent = torch.randn(3, 7, VOCAB, dtype=torch.float64)
    converted, _ = seqkern.convert(mixed)
    model64 = copy.deepcopy(mixed).double()
    ours = _outputs_and_grads(converted, tokens, cotangent)
    theirs = _outputs_and_grads(mixed, tokens, cotangent)
    ref64 = _outputs_and_grads(model64, tokens, cotangent)
    assert ours.keys() == theirs.keys() == ref64.keys()
    assert len(ours) > 60  # every parameter of every layer got its gradient
    for name in ours:
        assert_rule(name, ours[name], theirs[name], ref64[name])


def test_converted_model_matches_in_eval_mode(mixed):
    tokens = torch.randint(0, VOCAB, (2, 5))
    converted, _ = seqkern.convert(mixed.eval())
    model64 = copy.deepcopy(mixed).double()
    assert not converted.training and not converted.lstm.training
    with torch.no_grad():
        ours, theirs, ref64 = converted(tokens), mixed(tokens), model64(tokens)
    assert_rule("output", ours, theirs, ref64)


def test_report_lists_what_was_replaced_and_what_was_left(mixed):
    converted, report = seqkern.convert(mixed)
    replaced = {r.path: (r.source, r.target) for r in report.replaced}
    for path in ("lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "mha", "encoder", "encoder.layers.0",
                 "encoder.layers.1", "decoder_layer", "transformer", "transformer.encoder", "transformer.decoder"):
        assert path in replaced, (path, str(report))
    assert replaced["lstm"] == ("torch.nn.LSTM", "seqkern.nn.LSTM")
    left = {r.path: r.reason for r in report.left_alone}
    assert set(left) == {"custom", "parametrized"}, str(report)
    assert "subclass of torch.nn.GRU" in left["custom"] and "parametrize" in left["parametrized"]
    assert report.other_modules["Embedding"] == 1 and report.other_modules["Conv1d"] == 1
    text = str(report)
    assert "lstm: torch.nn.LSTM -> seqkern.nn.LSTM" in text and "custom" in text
    # The types behind the report.
    assert isinstance(converted.lstm, seqkern.nn.LSTM) and isinstance(converted.mha, seqkern.nn.MultiheadAttention)
    assert isinstance(converted.encoder.layers[1], seqkern.nn.TransformerEncoderLayer)
    assert isinstance(converted.transformer.decoder.layers[0], seqkern.nn.TransformerDecoderLayer)
    assert type(converted.custom) is CustomGRU
    assert parametrize.is_parametrized(converted.parametrized) and isinstance(converted.parametrized, nn.LSTM)
    assert converted.same_cell is converted.rnn_cell  # a shared module stays shared


def test_copy_by_default_inplace_on_request(mixed):
    original_types = {name: type(m) for name, m in mixed.named_modules()}
    converted, _ = seqkern.convert(mixed)
    assert converted is not mixed
    assert {name: type(m) for name, m in mixed.named_modules()} == original_types
    target = copy.deepcopy(mixed)
    same, _ = seqkern.convert(target, inplace=True)
    assert same is target and isinstance(target.gru, seqkern.nn.GRU)


def test_keeps_dtype_requires_grad_mode_and_hooks():
    lstm = nn.LSTM(5, 6, dtype=torch.float64).eval()
    lstm.weight_hh_l0.requires_grad_(False)
    calls = []
    lstm.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    converted, report = seqkern.convert(lstm)
    assert [r.path for r in report.replaced] == [""]  # the model itself
    assert isinstance(converted, seqkern.nn.LSTM) and not converted.training
    assert converted.weight_ih_l0.dtype == torch.float64 and not converted.weight_hh_l0.requires_grad
    assert converted.state_dict().keys() == lstm.state_dict().keys()
    for name, value in lstm.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, rtol=0, atol=0)
    converted(torch.randn(4, 2, 5, dtype=torch.float64))
    assert calls == ["LSTM"]


def test_model_without_sequence_layers_is_unchanged():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    converted, report = seqkern.convert(model)
    assert not report.replaced and not report.left_alone
    assert report.other_modules == {"Linear": 2, "ReLU": 1}
    assert [type(m) for m in converted] == [nn.Linear, nn.ReLU, nn.Linear]


def test_bad_input():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        seqkern.convert(torch.randn(3))


# The module objects are converted where they stand (their class reassigned): everything they hold carries over.
# Rebuilding each layer and copying its state_dict (round 14's convert) lost each of these silently.
class ScaledAttention(nn.MultiheadAttention):
    """A user's attention inside a stock layer: it must survive the layer's conversion."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return 3.0 * out, weights


def _layer_with_user_parts() -> nn.TransformerEncoderLayer:
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 16, dropout=0.0, batch_first=True)
    layer.self_attn = ScaledAttention(WIDTH, HEADS, batch_first=True)
    layer.linear1 = nn.Sequential(nn.Linear(WIDTH, 16), nn.Tanh())  # no in_features / weight of its own
    layer.norm2.eps = 0.25  # outside the state_dict
    layer.linear2.register_forward_hook(lambda module, args, out: out * 0.5)
    return layer.double()


def test_keeps_user_parts_child_hooks_and_changed_attributes():
    torch.manual_seed(2)
    lstm = nn.LSTM(WIDTH, WIDTH, batch_first=True).double()
    backward_calls = []
    lstm.register_full_backward_hook(lambda module, grad_in, grad_out: backward_calls.append(1))
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(WIDTH, HEADS, 16, dropout=0.0, batch_first=True),
                                    2).double().eval()
    encoder.use_nested_tensor = False  # changed after construction: padded positions keep their values
    model = nn.ModuleDict(dict(layer=_layer_with_user_parts(), lstm=lstm, encoder=encoder))
    converted, report = seqkern.convert(model)
    layer = converted["layer"]
    assert isinstance(layer, seqkern.nn.TransformerEncoderLayer) and type(layer.self_attn) is ScaledAttention
    assert {r.path: r.kind for r in report.left_alone} == {"layer.self_attn": "ScaledAttention"}, str(report)
    assert layer.norm2.eps == 0.25 and layer.linear2._forward_hooks and converted["encoder"].use_nested_tensor is False
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(converted["encoder"](x, src_key_padding_mask=padding),
                                   model["encoder"](x, src_key_padding_mask=padding), rtol=1e-12, atol=1e-12)
    results = []
    for m in (model, converted):
        out = m["lstm"](m["layer"](x))[0]
        results.append((out, *torch.autograd.grad(out.square().sum(), (x, *m.parameters()), allow_unused=True)))
    for got, want in zip(results[1], results[0]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(backward_calls) == 2  # the full backward hook ran for the converted LSTM too


def test_tied_weights_and_an_optimizer_built_before_stay_on_the_model():
    """An embedding tied to the LSTM's input weights, two attentions sharing their projection, an optimizer built
    before convert(inplace=True): the same Parameters before and after, and training equals torch.nn's."""
    torch.manual_seed(3)
    model = nn.ModuleDict(dict(embed=nn.Embedding(4 * WIDTH, WIDTH), lstm=nn.LSTM(WIDTH, WIDTH),
                               first=nn.MultiheadAttention(WIDTH, HEADS), second=nn.MultiheadAttention(WIDTH, HEADS)))
    model["embed"].weight = model["lstm"].weight_ih_l0  # (4W, W) both
    model["second"].in_proj_weight = model["first"].in_proj_weight
    model.double()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    converted, _ = seqkern.convert(model, inplace=True)
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))
    assert converted["embed"].weight is converted["lstm"].weight_ih_l0
    assert converted["second"].in_proj_weight is converted["first"].in_proj_weight
    assert isinstance(converted["lstm"], seqkern.nn.LSTM) and isinstance(converted["first"], seqkern.nn.MultiheadAttention)

    def loss(m, tokens):
        h = m["lstm"](m["embed"](tokens))[0]
        return (m["first"](h, h, h)[0] + m["second"](h, h, h)[0]).square().sum()

    tokens = torch.randint(0, 4 * WIDTH, (4, 3))
    before = converted["lstm"].weight_hh_l0.detach().clone()
    for m, opt in ((converted, optimizer), (reference, torch.optim.SGD(reference.parameters(), lr=0.1))):
        for _ in range(2):
            opt.zero_grad()
            loss(m, tokens).backward()
            opt.step()
    for (name, got), want in zip(converted.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(converted["lstm"].weight_hh_l0, before)  # the optimizer trained the converted model


@pytest.mark.parametrize("torch_cls", seqkern.conversion.SUPPORTED, ids=lambda c: c.__name__)
def test_converted_modules_hold_every_attribute_of_the_seqkern_constructors(torch_cls):
    """A converted module holds every attribute the seqkern.nn constructor would have set (torch.nn's own, plus
    conversion's _ADDED_ATTRIBUTES): a seqkern class that gains a constructor attribute fails here until convert
    sets it too."""
    args = {nn.MultiheadAttention: (WIDTH, HEADS), nn.TransformerEncoderLayer: (WIDTH, HEADS, 16),
            nn.TransformerDecoderLayer: (WIDTH, HEADS, 16), nn.Transformer: (WIDTH, HEADS, 1, 1, 16)}
    if torch_cls in (nn.TransformerEncoder, nn.TransformerDecoder):
        layer = (nn.TransformerEncoderLayer if torch_cls is nn.TransformerEncoder else nn.TransformerDecoderLayer)
        make = lambda module: module(layer(WIDTH, HEADS, 16), 2)  # noqa: E731
        ours_layer = (seqkern.nn.TransformerEncoderLayer if torch_cls is nn.TransformerEncoder
                      else seqkern.nn.TransformerDecoderLayer)
        fresh = seqkern.conversion.TARGETS[torch_cls](ours_layer(WIDTH, HEADS, 16), 2)
        converted, _ = seqkern.convert(make(torch_cls))
    else:
        converted, _ = seqkern.convert(torch_cls(*args.get(torch_cls, (WIDTH, WIDTH))))
        fresh = seqkern.conversion.TARGETS[torch_cls](*args.get(torch_cls, (WIDTH, WIDTH)))
    assert type(converted) is type(fresh)
    for name, module in fresh.named_modules():
        missing = set(vars(module)) - set(vars(converted.get_submodule(name)))
        assert not missing, f"{name or '<model>'}: {sorted(missing)}"
