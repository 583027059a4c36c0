"""Seq2Seq(attention=None), the context-vector encoder-decoder: the training step (logits, loss, every parameter's
gradient) under the rule against the model composed in this file from torch.nn's functional pieces in float64 (the
oracle) and against the torch.nn-built model in float32; decoding (greedy == beam 1, == the torch.nn-built model),
the state_dict, the decoder step under torch.compile, bad configuration."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_rule, seq2seq_batch
from torch.nn.utils.rnn import pack_padded_sequence

from seqkern.models import Seq2Seq

PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 19, 23
CONFIG = dict(embed_dim=12, hidden_size=16, attention=None, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def build(**options) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(SRC_VOCAB, TGT_VOCAB, **{**CONFIG, **options})


def batch(rows: int = 4, src_len: int = 7, tgt_len: int = 5, seed: int = 1):
    return seq2seq_batch(SRC_VOCAB, TGT_VOCAB, rows, src_len, tgt_len, seed, PAD, BOS, EOS)


def composed_logits(params: dict, options: dict, src, lengths, tgt_in):
    """The context-vector model from its definition: embeddings, torch.nn.LSTM/GRU encoder over the packed source,
    the bridge tanh(W [h_fwd; h_bwd] + b) per layer (bidirectional) or the final states as they are, the decoder
    torch.nn.LSTM/GRU from them over the embedded target, and the output layer on its outputs."""
    rnn_class = torch.nn.LSTM if options["rnn"] == "lstm" else torch.nn.GRU
    layers, bidirectional, hidden = options["num_layers"], options["bidirectional"], CONFIG["hidden_size"]

    def recurrent(prefix: str, input_size: int, directions: bool):
        """torch.nn's layer running on the float64 parameters themselves (so that they get the gradients)."""
        module = rnn_class(input_size, hidden, layers, batch_first=True, bidirectional=directions).double()
        weights = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
        return lambda *args: torch.func.functional_call(module, weights, args)

    encoder = recurrent("encoder.", CONFIG["embed_dim"], bidirectional)
    decoder = recurrent("decoder.", CONFIG["embed_dim"], False)
    x = F.embedding(src, params["src_embed.weight"], padding_idx=PAD)
    _, finals = encoder(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    finals = finals if options["rnn"] == "lstm" else (finals,)
    if bidirectional:
        finals = tuple(torch.tanh(F.linear(torch.cat([s[0::2], s[1::2]], -1), params["bridge.weight"],
                                           params["bridge.bias"])) for s in finals)
    state = finals if options["rnn"] == "lstm" else finals[0]
    top, _ = decoder(F.embedding(tgt_in, params["tgt_embed.weight"], padding_idx=PAD), state)
    return F.linear(top, params["output.weight"], params["output.bias"])


def step_results(logits, tgt_out, cotangent, parameters: dict) -> dict:
    """Logits, loss and the gradient of loss + <logits, cotangent> to every named parameter."""
    loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
    grads = torch.autograd.grad(loss + (logits * cotangent.to(logits.dtype)).sum(), list(parameters.values()))
    return {"logits": logits, "loss": loss, **{f"grad_{name}": g for name, g in zip(parameters, grads)}}


OPTIONS = [dict(rnn=rnn, bidirectional=bi, num_layers=layers)
           for rnn in ("lstm", "gru") for bi in (False, True) for layers in (1, 2)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o['rnn']}-{'bi' if o['bidirectional'] else 'uni'}"
                         f"-l{o['num_layers']}")
def test_training_step_follows_the_rule_against_the_composed_definition(options):
    ours = build(**options)
    theirs = build(**options, layers="torch")
    theirs.load_state_dict(ours.state_dict())
    src, lengths, tgt_in, tgt_out = batch()
    cotangent = torch.randn(*tgt_in.shape, TGT_VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    params64 = {name: p.detach().double().requires_grad_() for name, p in ours.named_parameters()}
    expected = step_results(composed_logits(params64, options, src, lengths, tgt_in), tgt_out, cotangent, params64)
    results = [step_results(model(src, lengths, tgt_in, need_weights=True).logits, tgt_out, cotangent,
                            dict(model.named_parameters())) for model in (ours, theirs)]
    assert ours(src, lengths, tgt_in, need_weights=True).attention is None
    assert_all_rule(*results, expected)


def test_state_dict_has_no_attention_and_loads_into_the_torch_built_model():
    model = build(rnn="gru")
    keys = set(model.state_dict())
    assert not any(key.startswith(("attention.", "combine.")) for key in keys)
    assert keys == set(build(rnn="gru", layers="torch").state_dict())
    with_attention = set(build(rnn="gru", attention="additive").state_dict())
    assert keys < with_attention


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_decoding_greedy_equals_beam_one_and_the_torch_built_model(rnn):
    ours = build(rnn=rnn, num_layers=2).eval()
    theirs = build(rnn=rnn, num_layers=2, layers="torch").eval()
    theirs.load_state_dict(ours.state_dict())
    src, lengths, _, _ = batch(rows=5)
    greedy, beam_one = ours.greedy_decode(src, lengths, max_len=6), ours.beam_search(src, lengths, 1, max_len=6)
    torch.testing.assert_close(greedy.tokens, beam_one.tokens, rtol=0, atol=0)
    torch.testing.assert_close(greedy.tokens, theirs.greedy_decode(src, lengths, max_len=6).tokens, rtol=0, atol=0)
    assert greedy.attention is None and beam_one.attention is None
    beam = ours.beam_search(src, lengths, beam_size=3, max_len=6)
    assert beam.tokens.shape[0] == 5 and beam.attention is None
    torch.testing.assert_close(beam.tokens, theirs.beam_search(src, lengths, 3, max_len=6).tokens, rtol=0, atol=0)


def test_teacher_forcing_equals_stepping_the_decoder():
    model = build(num_layers=2).eval()
    src, lengths, tgt_in, _ = batch()
    with torch.no_grad():
        out = model(src, lengths, tgt_in)
        source, state = model._encode(src, lengths)
        stepped = []
        for t in range(tgt_in.shape[1]):
            logits, state, _, weights = model._step(state, tgt_in[:, t], None, source, True)
            assert weights is None
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_decoder_step_compiles_fullgraph():
    model = build(rnn="lstm").eval()
    src, lengths, tgt_in, _ = batch()
    with torch.no_grad():
        source, state = model._encode(src, lengths)
        eager = model._step(state, tgt_in[:, 0], None, source, False)[0]
        compiled = torch.compile(model._step, fullgraph=True)(state, tgt_in[:, 0], None, source, False)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_input_feeding_needs_attention():
    with pytest.raises(ValueError, match="input_feeding"):
        build(input_feeding=True)
