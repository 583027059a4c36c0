"""seqkern.models.Seq2Seq: the training step (logits, attention weights, every parameter's gradient) against the
same model built from torch.nn layers and the composed PyTorch attention (the rule of DESIGN.md; the float64 oracle
is that model with the attention written from its definition in this file), teacher forcing
against the step-by-step decoder, greedy decoding against beam search of width 1, eos handling, state_dict both
ways, the attention heatmap, the example, bad input."""
import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_rule, seq2seq_batch

from seqkern.models import Decoded, Seq2Seq, plot_attention

PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 19, 23
CONFIG = dict(embed_dim=12, hidden_size=16, attention_hidden=20, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def build(dtype=torch.float32, **options) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(SRC_VOCAB, TGT_VOCAB, **{**CONFIG, **options}).to(dtype)


def composed_attention(module, query, keys, values, key_padding_mask, need_weights, projected_keys=None):
    """The attention of Bahdanau (score v . tanh(W_q q + W_k k)) and of Luong (dot: q . k, general: W_q q . k,
    concat: v . tanh(W [q; k])) written from the definitions: the oracle's attention, independent of seqkern's
    composed_forward and reference. query (B,Lq,Dq), keys (B,S,Dk), key_padding_mask (B,S) True = padding."""
    values = keys if values is None else values
    score = getattr(module, "score", "additive")
    key_side = module.project_keys(keys) if projected_keys is None else projected_keys  # W_k k: a Linear
    if score in ("additive", "concat"):
        w_q = module.query_proj.weight if score == "additive" else module.concat_proj.weight[:, :module.query_size]
        scores = torch.tanh((query @ w_q.t()).unsqueeze(-2) + key_side.unsqueeze(-3)) @ module.v
    else:
        query_side = query @ module.query_proj.weight.t() if score == "general" else query
        scores = query_side @ key_side.transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.unsqueeze(-2), float("-inf"))
    weights = scores.softmax(-1)  # every source has at least one token: no fully masked row
    return weights @ values, weights if need_weights else None


def twins(**options) -> tuple[Seq2Seq, Seq2Seq, Seq2Seq]:
    """seqkern's model (float32), the torch.nn-built one with the same weights (float32), and that one in float64
    with the attention written in this test: the oracle (torch.nn.LSTM/GRU, no seqkern op in it)."""
    ours = build(**options)
    theirs = build(**options, layers="torch")
    theirs.load_state_dict(ours.state_dict())
    oracle = copy.deepcopy(theirs).double()
    oracle.attention.composed_forward = functools.partial(composed_attention, oracle.attention)
    return ours, theirs, oracle


def batch(rows: int = 4, src_len: int = 7, tgt_len: int = 5, seed: int = 1):
    return seq2seq_batch(SRC_VOCAB, TGT_VOCAB, rows, src_len, tgt_len, seed, PAD, BOS, EOS)


def training_step(model: Seq2Seq, src, lengths, tgt_in, tgt_out, cotangent) -> dict:
    """Logits, attention weights, loss, and the gradient of every parameter of loss + <logits, cotangent>."""
    out = model(src, lengths, tgt_in, need_weights=True)
    loss = F.cross_entropy(out.logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
    model.zero_grad()
    (loss + (out.logits * cotangent.to(out.logits.dtype)).sum()).backward()
    results = {"logits": out.logits, "attention": out.attention, "loss": loss}
    results.update({f"grad_{name}": p.grad for name, p in model.named_parameters()})
    return results


MODEL_CASES = [
    dict(rnn=rnn, attention=attention, bidirectional=bidirectional, input_feeding=feeding)
    for rnn in ("lstm", "gru") for attention in ("additive", "dot", "general", "concat")
    for bidirectional in (False, True) for feeding in (False, True)
    if not (attention == "dot" and bidirectional)
]


@pytest.mark.parametrize("options", MODEL_CASES, ids=lambda o: "-".join(
    [o["rnn"], o["attention"], "bi" if o["bidirectional"] else "uni", "feed" if o["input_feeding"] else "nofeed"]))
def test_training_step_follows_the_rule(options):
    assert_step_follows_the_rule(twins(**options), batch())


def test_two_layers_with_dropout_in_eval():
    """num_layers=2 (the bridge per layer, the cell step per layer) with dropout that eval() switches off."""
    models = tuple(m.eval() for m in twins(num_layers=2, dropout=0.3, rnn="lstm", input_feeding=True))
    assert_step_follows_the_rule(models, batch(rows=3, src_len=6, tgt_len=4))


def assert_step_follows_the_rule(models, data) -> None:
    """Our, torch's and the float64 torch model's training steps on one batch, under the rule."""
    ours, theirs, ref = models
    src, lengths, tgt_in, tgt_out = data
    cotangent = torch.randn(*tgt_in.shape, TGT_VOCAB, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
    expected = training_step(ref, src, lengths, tgt_in, tgt_out, cotangent)
    assert_all_rule(training_step(ours, src, lengths, tgt_in, tgt_out, cotangent),
                    training_step(theirs, src, lengths, tgt_in, tgt_out, cotangent), expected)


def test_dropout_is_active_in_training_only():
    model = build(num_layers=2, dropout=0.5)
    src, lengths, tgt_in, _ = batch()
    first, second = model(src, lengths, tgt_in).logits, model(src, lengths, tgt_in).logits
    assert not torch.equal(first, second)
    model.eval()
    torch.testing.assert_close(model(src, lengths, tgt_in).logits, model(src, lengths, tgt_in).logits,
                               rtol=0, atol=0)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("attention", ["additive", "general"])
def test_teacher_forcing_equals_stepping_the_decoder(rnn, attention):
    """The whole-target decoder call (no input feeding) equals `_step` run token by token (what decoding uses)."""
    model = build(rnn=rnn, attention=attention, num_layers=2).eval()
    src, lengths, tgt_in, _ = batch()
    with torch.no_grad():
        out = model(src, lengths, tgt_in, need_weights=True)
        source, state = model._encode(src, lengths)
        stepped, weights = [], []
        for t in range(tgt_in.shape[1]):
            logits, state, _, step_weights = model._step(state, tgt_in[:, t], None, source, True)
            stepped.append(logits)
            weights.append(step_weights)
    torch.testing.assert_close(torch.stack(stepped, 1), out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(weights, 1), out.attention, rtol=1e-5, atol=1e-5)


def test_attention_weights_are_zero_on_source_padding_and_sum_to_one():
    model = build()
    src, lengths, tgt_in, _ = batch()
    weights = model(src, lengths, tgt_in, need_weights=True).attention
    padding = torch.arange(src.shape[1]) >= lengths[:, None]
    assert bool((weights.masked_select(padding[:, None, :].expand_as(weights)) == 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert model(src, lengths, tgt_in).attention is None


def test_padding_of_the_source_changes_nothing():
    """A row's output does not depend on what sits past its length, nor on the other rows' padding."""
    model = build(bidirectional=True).eval()
    src, lengths, tgt_in, _ = batch()
    wider = F.pad(src, (0, 3), value=PAD)
    wider[:, -3:] = EOS + 1  # junk past every length
    torch.testing.assert_close(model(wider, lengths, tgt_in).logits, model(src, lengths, tgt_in).logits,
                               rtol=1e-5, atol=1e-6)
    alone = model(src[:1, :int(lengths[0])], lengths[:1], tgt_in[:1]).logits
    torch.testing.assert_close(alone, model(src, lengths, tgt_in).logits[:1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Decoding.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(rnn="lstm"), dict(rnn="gru", attention="concat", input_feeding=True),
                                     dict(rnn="lstm", attention="dot", bidirectional=False, num_layers=2)],
                         ids=["lstm-additive", "gru-concat-feed", "lstm-dot-2layers"])
def test_beam_search_of_width_one_is_greedy_decoding(options):
    model = build(**options).eval()
    src, lengths, _, _ = batch(rows=5)
    greedy = model.greedy_decode(src, lengths, max_len=9)
    beam = model.beam_search(src, lengths, beam_size=1, max_len=9, length_penalty=0.0)
    torch.testing.assert_close(beam.tokens, greedy.tokens, rtol=0, atol=0)
    torch.testing.assert_close(beam.lengths, greedy.lengths, rtol=0, atol=0)
    torch.testing.assert_close(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(beam.attention, greedy.attention, rtol=1e-6, atol=1e-6)


class _GreedyDecoder(torch.nn.Module):
    def __init__(self, model: Seq2Seq):
        super().__init__()
        self.model = model

    def forward(self, src, lengths, max_len):
        return self.model.greedy_decode(src, lengths, max_len)


def test_decoding_reads_the_current_decoder_weights():
    """torch.func.functional_call swaps parameters for one call: decoding must read the swapped ones (the decoder's
    _flat_weights list still holds the module's own), as the same model with those weights loaded does."""
    model, other = build().eval(), build().eval()
    torch.manual_seed(1)
    other.decoder.reset_parameters()
    src, lengths, _, _ = batch(rows=3)
    swapped = {f"model.decoder.{name}": p for name, p in other.decoder.named_parameters()}
    with torch.no_grad():
        got = torch.func.functional_call(_GreedyDecoder(model), swapped, (src, lengths, 7), strict=False)
        model.decoder.load_state_dict(other.decoder.state_dict())
        expected = model.greedy_decode(src, lengths, max_len=7)
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=0, atol=0)


def test_greedy_scores_are_the_log_probability_of_the_decoded_tokens():
    """Teacher-forcing the decoded tokens gives back their log-probability and their attention weights."""
    model = build(input_feeding=True).eval()
    src, lengths, _, _ = batch(rows=3)
    decoded = model.greedy_decode(src, lengths, max_len=6)
    tgt_in = torch.cat([torch.full((3, 1), BOS), decoded.tokens[:, :-1]], 1)
    with torch.no_grad():
        out = model(src, lengths, tgt_in, need_weights=True)
    log_probs = out.logits.log_softmax(-1).gather(2, decoded.tokens.unsqueeze(-1)).squeeze(-1)
    alive = torch.arange(decoded.tokens.shape[1]) < decoded.lengths[:, None]
    torch.testing.assert_close(log_probs.masked_fill(~alive, 0).sum(1), decoded.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attention.masked_fill(~alive[..., None], 0), decoded.attention,
                               rtol=1e-5, atol=1e-6)


def test_eos_ends_a_sequence_and_pads_after_it():
    model = build().eval()
    with torch.no_grad():  # the output layer always prefers eos, then token 3
        model.output.weight.zero_()
        model.output.bias.zero_()
        model.output.bias[EOS] = 5.0
        model.output.bias[3] = 4.0
    src, lengths, _, _ = batch(rows=3)
    for decoded in (model.greedy_decode(src, lengths, max_len=8),
                    model.beam_search(src, lengths, beam_size=3, max_len=8)):
        assert isinstance(decoded, Decoded)
        assert decoded.tokens.tolist() == [[EOS]] * 3
        assert decoded.lengths.tolist() == [1, 1, 1]
        assert decoded.attention.shape == (3, 1, src.shape[1])


def test_eos_mid_sequence_stops_that_row_only():
    """Rows finish at different steps: whatever an untrained model decodes, eos only ends a row, pad follows it,
    the attention after it is 0 and each live step's weights sum to 1."""
    model = build(rnn="gru").eval()
    src, lengths, _, _ = batch(rows=6, seed=5)
    for decoded in (model.greedy_decode(src, lengths, max_len=10),
                    model.beam_search(src, lengths, beam_size=3, max_len=10, length_penalty=0.6)):
        width = decoded.tokens.shape[1]
        assert width == int(decoded.lengths.max())
        for row, length in enumerate(decoded.lengths.tolist()):
            tokens = decoded.tokens[row].tolist()
            assert EOS not in tokens[:length - 1]
            assert tokens[length:] == [PAD] * (width - length)
            assert tokens[length - 1] == EOS or length == 10
            assert bool((decoded.attention[row, length:] == 0).all())
            torch.testing.assert_close(decoded.attention[row, :length].sum(-1), torch.ones(length))


def test_a_wider_beam_finds_no_worse_hypothesis():
    """Beam search's total log-prob (length_penalty=0) of its best hypothesis is at least greedy's."""
    model = build().eval()
    src, lengths, _, _ = batch(rows=6, seed=7)
    greedy = model.greedy_decode(src, lengths, max_len=6)
    beam = model.beam_search(src, lengths, beam_size=5, max_len=6, length_penalty=0.0)
    finished = (greedy.tokens == EOS).any(1) & (beam.tokens == EOS).any(1)
    assert bool((beam.scores[finished] >= greedy.scores[finished] - 1e-5).all())


def test_decoding_matches_the_torch_built_model():
    ours, theirs, _ = twins(rnn="lstm", input_feeding=True)
    ours.eval(), theirs.eval()
    src, lengths, _, _ = batch(rows=4)
    for decode in (lambda m: m.greedy_decode(src, lengths, 7), lambda m: m.beam_search(src, lengths, 3, 7)):
        mine, yours = decode(ours), decode(theirs)
        torch.testing.assert_close(mine.tokens, yours.tokens, rtol=0, atol=0)
        torch.testing.assert_close(mine.scores, yours.scores, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Parameters, the plot, compile, the example.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_state_dict_loads_both_ways(rnn):
    ours, theirs = build(rnn=rnn, num_layers=2), build(rnn=rnn, num_layers=2, layers="torch")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(build(rnn=rnn, num_layers=2, layers="torch").state_dict())
    ours.load_state_dict(theirs.state_dict())
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, theirs.state_dict()[name], rtol=0, atol=0)


def test_plot_attention_writes_a_png(tmp_path):
    model = build().eval()
    src, lengths, _, _ = batch(rows=1, src_len=5)
    decoded = model.greedy_decode(src, lengths, max_len=4)
    n, m = int(lengths[0]), int(decoded.lengths[0])
    path = plot_attention(decoded.attention[0, :m, :n], [f"s{i}" for i in range(n)], [f"t{i}" for i in range(m)],
                          tmp_path / "sub" / "heat.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("call, match", [
    (lambda: plot_attention(torch.rand(2, 3, 1), ["a"] * 3, ["b"] * 2, "x.png"), "2-D floating"),
    (lambda: plot_attention(torch.rand(2, 3), ["a"] * 2, ["b"] * 2, "x.png"), "expected 3 labels"),
    (lambda: plot_attention(torch.rand(2, 3), "abc", ["b"] * 2, "x.png"), "sequence of str"),
    (lambda: plot_attention([[0.5]], ["a"], ["b"], "x.png"), "torch.Tensor"),
])
def test_plot_attention_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_decoder_step_compiles_fullgraph(rnn):
    """The decoder step every decoding loop (and input-feeding training) runs, fused cell ops and attention
    included, under torch.compile(fullgraph=True) equals eager, gradients included."""
    model = build(rnn=rnn, num_layers=2, input_feeding=True)
    src, lengths, tgt_in, _ = batch()
    source, state = model._encode(src, lengths)
    feed = torch.randn(src.shape[0], CONFIG["hidden_size"], generator=torch.Generator().manual_seed(2))
    step = torch.compile(model._step, fullgraph=True)
    outputs = {}
    for name, run in (("eager", model._step), ("compiled", step)):
        logits, new_state, new_feed, weights = run(state, tgt_in[:, 0], feed, source, True)
        loss = logits.square().sum() + new_feed.sum() + sum(s.sum() for s in new_state)
        outputs[name] = [logits, *new_state, new_feed, weights,
                         *torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)]
    for got, want in zip(outputs["compiled"], outputs["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_step_compiles():
    """The whole teacher-forced forward compiles (with a graph break: dynamo does not trace
    pack_padded_sequence, for torch.nn's models either) and equals eager, gradients included."""
    model = build(rnn="gru")
    src, lengths, tgt_in, _ = batch()
    compiled = torch.compile(model)
    results = []
    for run in (model, compiled):
        logits = run(src, lengths, tgt_in).logits
        results.append([logits, *torch.autograd.grad(logits.square().sum(), list(model.parameters()))])
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_seq2seq_reverse_example_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "examples" / "seq2seq_reverse.py"), "--quick", "--out",
                             str(tmp_path / "heat.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "held-out exact match" in result.stdout and "time per training step" in result.stdout
    assert (tmp_path / "heat.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------------------
SRC, LENGTHS, TGT_IN, _ = batch()


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(SRC.float(), LENGTHS, TGT_IN), TypeError, "src"),
    (lambda m: m(SRC + SRC_VOCAB, LENGTHS, TGT_IN), ValueError, "src"),
    (lambda m: m(SRC, LENGTHS.float(), TGT_IN), TypeError, "integer"),
    (lambda m: m(SRC, LENGTHS[:2], TGT_IN), ValueError, "one length per row"),
    (lambda m: m(SRC, LENGTHS * 0, TGT_IN), ValueError, r"lengths in \[1, 7\]"),
    (lambda m: m(SRC, LENGTHS + 7, TGT_IN), ValueError, r"lengths in \[1, 7\]"),
    (lambda m: m(SRC, LENGTHS, TGT_IN[:2]), ValueError, "batch as src"),
    (lambda m: m(SRC, LENGTHS, TGT_IN[:, :0]), ValueError, "T >= 1"),
    (lambda m: m(SRC, LENGTHS, TGT_IN + TGT_VOCAB), ValueError, "tgt_in"),
    (lambda m: m(SRC, LENGTHS, TGT_IN, need_weights=1), TypeError, "need_weights"),
    (lambda m: m.greedy_decode(SRC, LENGTHS, 0), ValueError, "max_len"),
    (lambda m: m.beam_search(SRC, LENGTHS, beam_size=0), ValueError, "beam_size"),
    (lambda m: m.beam_search(SRC, LENGTHS, length_penalty=-1.0), ValueError, "length_penalty"),
    (lambda m: m.greedy_decode(SRC, LENGTHS[:, None], 4), ValueError, "one length per row"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(build())


@pytest.mark.parametrize("options, error, match", [
    (dict(rnn="rnn"), ValueError, "rnn"),
    (dict(attention="bilinear"), ValueError, "attention"),
    (dict(layers="jax"), ValueError, "layers"),
    (dict(attention="dot", bidirectional=True), ValueError, "'dot' score"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(num_layers=1.5), ValueError, "num_layers"),
    (dict(attention_hidden=0), ValueError, "attention_hidden"),
    (dict(bidirectional=1), TypeError, "bidirectional"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(eos_id=TGT_VOCAB), ValueError, "eos_id"),
    (dict(pad_id=-1), ValueError, "pad_id"),
])
def test_bad_configuration(options, error, match):
    with pytest.raises(error, match=match):
        build(**options)
