"""Deploying seqkern's modules: ONNX, torch.export and AOTInductor.

ONNX: each module is exported once with a plain `torch.onnx.export(module, args, path, dynamo=True,
dynamic_shapes=...)` at one sequence length and batch size, and the ONNX model runs in onnxruntime at two other
lengths and two other batch sizes. Its outputs must match the module's and those of torch.nn's counterpart with the
same weights (the independent oracle) in float32 within 1e-4.
torch.export: the program keeps the fused ops and its weights as parameters, survives torch.export.save/load, and
compiles with AOTInductor; all run at other shapes than the exported ones.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from unittest import mock

import onnxruntime
import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.utils._pytree import tree_leaves

import seqkern

EXPORT_AT = (4, 3)                                   # (sequence length, batch) of the example inputs
RUNS = list(itertools.product((3, 9), (2, 5)))      # (sequence length, batch) of the ONNX runs
TOLERANCE = dict(atol=1e-4, rtol=1e-4)
Args = Callable[[int, int], tuple]                   # (seq_len, batch) -> the forward's positional arguments


@pytest.fixture(scope="module", autouse=True)
def one_onnx_registry():
    """torch.onnx.export rebuilds its registry of ~500 ONNX translations at every call (3-6 s here, most of a small
    export); the tests share one. Only the reuse is patched: the registry is the one each call would build."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    with mock.patch.object(_registration.ONNXRegistry, "from_torchlib", classmethod(lambda cls, **_: registry)):
        yield


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tensors(outputs) -> list[Tensor]:
    return [t for t in tree_leaves(outputs) if isinstance(t, Tensor)]


def check_onnx(tmp_path, ours: nn.Module, theirs: nn.Module, make_args: Args, dynamic_shapes, runs=RUNS) -> None:
    """Exports `ours` at EXPORT_AT, then runs the ONNX model at each (seq_len, batch) of `runs` against `ours` and
    `theirs` (torch.nn's module with the same weights)."""
    ours.eval(), theirs.eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(ours, make_args(*EXPORT_AT), path, dynamo=True, dynamic_shapes=dynamic_shapes)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq_len, batch in runs:
        args = make_args(seq_len, batch)
        inputs = tensors(args)
        assert len(session.get_inputs()) == len(inputs)
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
        with torch.no_grad():
            for module in (ours, theirs):
                expected = tensors(module(*args))
                assert len(got) == len(expected), (len(got), len(expected))
                for g, e in zip(got, expected):
                    torch.testing.assert_close(torch.from_numpy(g), e, **TOLERANCE,
                                               msg=lambda m: f"{type(module).__module__} T={seq_len} B={batch}: {m}")


def twins(torch_cls, ours_cls, *args, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(seqkern module, torch.nn module) with the same weights."""
    torch.manual_seed(0)
    theirs = torch_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# ------------------------------------------------------------------------------------------------------------
# Recurrent layers and cells.
# ------------------------------------------------------------------------------------------------------------
def recurrent_case(module: nn.RNNBase, with_hx: bool, unbatched: bool) -> tuple[Args, tuple]:
    """The arguments (input[, hx]) of a recurrent layer and their dynamic dims."""
    stacked = module.num_layers * (2 if module.bidirectional else 1)
    widths = (module.proj_size or module.hidden_size, module.hidden_size) if module.mode == "LSTM" else \
        (module.hidden_size,)

    def make_args(seq_len: int, batch: int) -> tuple:
        seed = 100 * seq_len + batch
        if unbatched:
            x = randn(seq_len, module.input_size, seed=seed)
        elif module.batch_first:
            x = randn(batch, seq_len, module.input_size, seed=seed)
        else:
            x = randn(seq_len, batch, module.input_size, seed=seed)
        if not with_hx:
            return (x,)
        states = tuple(randn(stacked, *(() if unbatched else (batch,)), w, seed=seed + i + 1)
                       for i, w in enumerate(widths))
        return (x, states if module.mode == "LSTM" else states[0])

    x_dims = {0: "T"} if unbatched else {0: "B", 1: "T"} if module.batch_first else {0: "T", 1: "B"}
    state_dims = {} if unbatched else {1: "B"}  # {}: static ((None, None) trips the exporter's conversion)
    hx_dims = tuple(state_dims for _ in widths) if module.mode == "LSTM" else state_dims
    return make_args, ((x_dims, hx_dims) if with_hx else (x_dims,))


RECURRENT = {"LSTM": (nn.LSTM, seqkern.nn.LSTM), "GRU": (nn.GRU, seqkern.nn.GRU), "RNN": (nn.RNN, seqkern.nn.RNN)}
RECURRENT_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True), False, False),
    ("LSTM", dict(batch_first=True, bias=False, bidirectional=True, proj_size=3), True, False),
    ("LSTM", dict(num_layers=2, dropout=0.5), True, True),
    ("GRU", dict(num_layers=2, bidirectional=True, dropout=0.5), True, False),
    ("GRU", dict(batch_first=True, bias=False), False, True),
    ("RNN", dict(num_layers=2, bidirectional=True, batch_first=True, nonlinearity="relu"), True, False),
    ("RNN", dict(bias=False), False, True),
]


@pytest.mark.parametrize("kind, options, with_hx, unbatched", RECURRENT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(RECURRENT_CASES)])
def test_onnx_recurrent(tmp_path, kind, options, with_hx, unbatched):
    ours, theirs = twins(*RECURRENT[kind], 5, 7, **options)
    make_args, dynamic_shapes = recurrent_case(ours, with_hx, unbatched)
    check_onnx(tmp_path, ours, theirs, make_args, dynamic_shapes, runs=[(3, 1), (9, 1)] if unbatched else RUNS)


class _WithLengths(nn.Module):
    """(x, lengths) -> the layer's outputs: seqkern's through lengths=, torch.nn's through pack/pad (the definition)."""

    def __init__(self, layer: nn.RNNBase):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, lengths: Tensor):
        if isinstance(self.layer, seqkern.nn.LSTM | seqkern.nn.GRU | seqkern.nn.RNN):
            return self.layer(x, lengths=lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        output, final = self.layer(packed)
        return nn.utils.rnn.pad_packed_sequence(output, total_length=x.shape[0])[0], final


@pytest.mark.parametrize("kind, options", [("LSTM", dict(num_layers=2, bidirectional=True)),
                                           ("GRU", dict(bidirectional=True)), ("RNN", dict(bias=False))])
def test_onnx_recurrent_with_lengths(tmp_path, kind, options):
    """lengths become ONNX's sequence_lens: outputs 0 past each length, final states at each last valid step."""
    ours, theirs = (_WithLengths(m) for m in twins(*RECURRENT[kind], 5, 7, **options))

    def make_args(seq_len: int, batch: int) -> tuple:
        lengths = torch.randint(1, seq_len + 1, (batch,), generator=torch.Generator().manual_seed(seq_len + batch))
        lengths[0] = seq_len
        return randn(seq_len, batch, 5, seed=seq_len * batch), lengths

    check_onnx(tmp_path, ours, theirs, make_args, ({0: "T", 1: "B"}, {0: "B"}))


@pytest.mark.parametrize("flag", ["resets", "zoneout", "projection"])
def test_onnx_refuses_what_a_recurrent_node_cannot_express(tmp_path, flag):
    layer = seqkern.nn.LSTM(5, 7, proj_size=3 if flag == "projection" else 0,
                            zoneout=0.2 if flag == "zoneout" else 0.0).eval()
    x, lengths = randn(4, 3, 5, seed=0), torch.tensor([4, 2, 1])
    kwargs = {"resets": dict(resets=torch.zeros(4, 3, dtype=torch.bool)), "zoneout": {},
              "projection": dict(lengths=lengths)}[flag]

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, **kwargs)

    with pytest.raises(Exception, match="cannot be exported to ONNX") as info:
        torch.onnx.export(Call().eval(), (x,), tmp_path / "model.onnx", dynamo=True)
    assert {"resets": "resets", "zoneout": "zoneout", "projection": "proj_size"}[flag] in str(info.value)


CELLS = [
    (nn.LSTMCell, seqkern.nn.LSTMCell, dict(), True),
    (nn.GRUCell, seqkern.nn.GRUCell, dict(bias=False), False),
    (nn.RNNCell, seqkern.nn.RNNCell, dict(nonlinearity="relu"), True),
]


@pytest.mark.parametrize("torch_cls, ours_cls, options, with_hx", CELLS, ids=[c[0].__name__ for c in CELLS])
def test_onnx_cell(tmp_path, torch_cls, ours_cls, options, with_hx):
    ours, theirs = twins(torch_cls, ours_cls, 5, 7, **options)
    is_lstm = torch_cls is nn.LSTMCell

    def make_args(_, batch):
        x = randn(batch, 5, seed=batch)
        if not with_hx:
            return (x,)
        h = randn(batch, 7, seed=batch + 1)
        return (x, (h, randn(batch, 7, seed=batch + 2)) if is_lstm else h)

    dims = {0: "B"}
    hx_dims = (dims, dims) if is_lstm else dims
    check_onnx(tmp_path, ours, theirs, make_args, (dims, hx_dims) if with_hx else (dims,), runs=[(1, 2), (1, 5)])


# ------------------------------------------------------------------------------------------------------------
# Attention and the Transformer.
# ------------------------------------------------------------------------------------------------------------
def padding(batch: int, length: int) -> Tensor:
    """(B, length) bool, True = padded: every other sequence loses its last position (never all of them)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[::2, -1] = True
    return mask


def causal(length: int) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(length)


@pytest.mark.parametrize("case", ["cross-masks-weights", "self-causal-batch_first"])
def test_onnx_multihead_attention(tmp_path, case):
    if case == "cross-masks-weights":
        ours, theirs = twins(nn.MultiheadAttention, seqkern.nn.MultiheadAttention, 8, 2, kdim=6, vdim=5)

        def make_args(seq_len, batch):  # query (T,B,8), key (S,B,6), value (S,B,5), S = T + 2
            keys = seq_len + 2
            return (randn(seq_len, batch, 8, seed=seq_len), randn(keys, batch, 6, seed=batch),
                    randn(keys, batch, 5, seed=batch + 1), padding(batch, keys), True,
                    randn(seq_len, keys, seed=seq_len + batch), False)

        dynamic = ({0: "T", 1: "B"}, {0: "S", 1: "B"}, {0: "S", 1: "B"}, {0: "B", 1: "S"}, None, {0: "T", 1: "S"},
                   None)
    else:
        ours, theirs = twins(nn.MultiheadAttention, seqkern.nn.MultiheadAttention, 8, 2, batch_first=True,
                             bias=False)

        def make_args(seq_len, batch):  # query, key, value (B,T,8), the causal mask with the is_causal hint
            x = [randn(batch, seq_len, 8, seed=seq_len + i) for i in range(3)]
            return (*x, None, False, causal(seq_len), True, True)

        dynamic = ({0: "B", 1: "T"},) * 3 + (None, None, {0: "T", 1: "T"}, None, None)
    check_onnx(tmp_path, ours, theirs, make_args, dynamic)


@pytest.mark.parametrize("case", ["Transformer", "TransformerEncoder"])
def test_onnx_transformer(tmp_path, case):
    """The stacks, and through them both layer classes."""
    if case == "Transformer":
        ours, theirs = twins(nn.Transformer, seqkern.nn.Transformer, 8, 2, 1, 1, 16, batch_first=True)

        def make_args(seq_len, batch):  # src (B,S,8) with S = T + 1, tgt (B,T,8), causal tgt_mask, paddings
            return (randn(batch, seq_len + 1, 8, seed=seq_len), randn(batch, seq_len, 8, seed=batch), None,
                    causal(seq_len), None, padding(batch, seq_len + 1), None, padding(batch, seq_len + 1), None, True)

        dynamic = ({0: "B", 1: "S"}, {0: "B", 1: "T"}, None, {0: "T", 1: "T"}, None, {0: "B", 1: "S"}, None,
                   {0: "B", 1: "S"}, None, None)
    else:
        def stack(encoder_cls, layer_cls):
            layer = layer_cls(8, 2, 16, activation="gelu", norm_first=True)
            return encoder_cls(layer, 2, norm=nn.LayerNorm(8))

        torch.manual_seed(0)
        theirs = stack(nn.TransformerEncoder, nn.TransformerEncoderLayer)
        ours = stack(seqkern.nn.TransformerEncoder, seqkern.nn.TransformerEncoderLayer)
        ours.load_state_dict(theirs.state_dict())

        def make_args(seq_len, batch):  # src (T,B,8), a float mask (T,T), padding, is_causal=False (not detected)
            return (randn(seq_len, batch, 8, seed=seq_len), randn(seq_len, seq_len, seed=batch),
                    padding(batch, seq_len), False)

        dynamic = ({0: "T", 1: "B"}, {0: "T", 1: "T"}, {0: "B", 1: "T"}, None)
    check_onnx(tmp_path, ours, theirs, make_args, dynamic)


class Composed(nn.Module):
    """An attention module's composed-PyTorch forward, as a module."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, *args):
        return self.attention.composed_forward(*args)


@pytest.mark.parametrize("cls, options", [(seqkern.nn.AdditiveAttention, (6, 5, 7)),
                                          (seqkern.nn.LuongAttention, (6, 5, "general"))], ids=["Additive", "Luong"])
def test_onnx_additive_and_luong_attention(tmp_path, cls, options):
    torch.manual_seed(0)
    module = cls(*options)

    def make_args(seq_len, batch):  # query (B,T,6), keys (B,S,5) with S = T + 2, values = keys, padding, weights
        keys = randn(batch, seq_len + 2, 5, seed=batch)
        return randn(batch, seq_len, 6, seed=seq_len), keys, None, padding(batch, seq_len + 2), True

    dynamic = ({0: "B", 1: "T"}, {0: "B", 1: "S"}, None, {0: "B", 1: "S"}, None)
    check_onnx(tmp_path, module, Composed(module), make_args, dynamic)


class Tagger(nn.Module):
    """A user's torch.nn model: embedding, BiLSTM, self-attention, a Transformer layer, a GRU."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width // 2, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(width, 2, 16, batch_first=True)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x, _ = self.lstm(self.embed(tokens))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x, _ = self.gru(self.encoder(x))
        return self.head(x)


def test_onnx_converted_model(tmp_path):
    torch.manual_seed(0)
    model = Tagger().eval()
    converted, report = seqkern.convert(model)
    assert len(report.replaced) == 5, str(report)  # lstm, gru, attn, encoder and its self_attn
    check_onnx(tmp_path, converted, model, lambda seq_len, batch: (torch.randint(0, 11, (batch, seq_len)),),
               ({0: "B", 1: "T"},))


# ------------------------------------------------------------------------------------------------------------
# torch.export and AOTInductor: the fused kernels stay in the program.
# ------------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """seqkern.nn.LSTM then seqkern.nn.MultiheadAttention over its output, batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = seqkern.nn.LSTM(5, 4, batch_first=True, bidirectional=True)
        self.attn = seqkern.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, (h_n, _) = self.lstm(x)
        return self.attn(y, y, y, key_padding_mask=key_padding_mask, need_weights=False)[0], y, h_n


def encoder_args(seq_len: int, batch: int) -> tuple[Tensor, Tensor]:
    return randn(batch, seq_len, 5, seed=seq_len + batch), padding(batch, seq_len)


def export_encoder() -> tuple[torch.export.ExportedProgram, nn.Module]:
    """torch.export of Encoder with dynamic sequence length and batch."""
    torch.manual_seed(0)
    module = Encoder().eval()
    dims = {0: Dim("B"), 1: Dim("T")}  # the input and the padding mask share both
    return torch.export.export(module, encoder_args(*EXPORT_AT), dynamic_shapes=(dims, dims)), module


def check_runs(run: Callable, module: nn.Module) -> None:
    for seq_len, batch in RUNS:
        args = encoder_args(seq_len, batch)
        with torch.no_grad():
            for got, want in zip(run(*args), module(*args), strict=True):
                torch.testing.assert_close(got, want, **TOLERANCE)


def test_torch_export_save_load(tmp_path):
    program, module = export_encoder()
    fused = {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "seqkern" in str(n.target)}
    assert fused == {"seqkern.lstm_forward.default", "seqkern.flash_attention_forward.default"}
    # The weights are the module's parameters, not tensors captured at trace time.
    assert set(program.graph_signature.parameters) == set(dict(module.named_parameters()))
    assert not program.graph_signature.lifted_tensor_constants
    torch.export.save(program, tmp_path / "program.pt2")
    check_runs(torch.export.load(tmp_path / "program.pt2").module(), module)


def test_aot_inductor(tmp_path):
    """One compiled model for both modules: each AOTInductor compilation costs tens of seconds here."""
    program, module = export_encoder()
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    check_runs(torch._inductor.aoti_load_package(path), module)
