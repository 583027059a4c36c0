"""Seq2Seq: a recurrent encoder-decoder with attention (Bahdanau or Luong) or without (the context-vector model),
greedy decoding and beam search.

    model = seqkern.models.Seq2Seq(src_vocab_size=8000, tgt_vocab_size=8000, rnn="lstm", attention="additive")
    out = model(src, src_lengths, tgt_in)                     # logits (B, T, tgt_vocab)
    loss = F.cross_entropy(out.logits.flatten(0, 1), tgt_out.flatten(), ignore_index=model.pad_id)
    dec = model.eval().beam_search(src, src_lengths, beam_size=4, max_len=50)

Architecture (H = hidden_size, D = 2 if bidirectional else 1):
- Embeddings `src_embed`, `tgt_embed` (padding_idx=pad_id), dropout on their outputs.
- Encoder `encoder`: an LSTM/GRU (embed_dim -> H, num_layers, bidirectional) over the packed source (src_lengths,
  any order) -> memory (B, S, D*H), zero at padding; key_padding_mask = positions >= src_lengths.
- Bridge: bidirectional, layer l of the decoder starts from tanh(`bridge`([h_fwd_l; h_bwd_l])) (`bridge` =
  Linear(2H, H), the same Linear for the LSTM's c); unidirectional, from the encoder's final states.
- Decoder `decoder`: ONE multi-layer LSTM/GRU (embed_dim (+ H with input_feeding) -> H). Its top-layer output h_t
  is the query of a global attention over the memory (keys = values = memory): `attention` is
  seqkern.nn.AdditiveAttention(H, D*H, attention_hidden or H) or seqkern.nn.LuongAttention(H, D*H, score,
  hidden_size=attention_hidden or H). The "dot" score needs D*H == H, i.e. a unidirectional encoder.
- Attentional vector h~_t = tanh(`combine`([context_t; h_t])), combine = Linear(D*H + H, H, bias=False);
  logits = `output`(dropout(h~_t)), output = Linear(H, tgt_vocab).
- attention=None is the context-vector encoder-decoder (Sutskever et al. 2014; Cho et al. 2014): no attention and
  no `combine`; the decoder starts from the bridged encoder final state, the only thing it knows of the source,
  and logits = `output`(dropout(h_t)). Everything else (bridge, decoding) is shared; input_feeding needs attention.
- Without input feeding, teacher-forced training runs the decoder over all T target tokens in one fused call and
  the attention with all T queries at once. With input_feeding (Luong et al. 2015) the decoder input at step t is
  [embed(y_{t-1}); h~_{t-1}] (h~_0 = 0), so training steps token by token through `_step`, the function greedy
  decoding and beam search step with too: per decoder layer the fused cell op (seqkern.ops.lstm.lstm_cell /
  seqkern.ops.gru.gru_cell) on that layer's weights of `decoder`, then attention with one query on the keys
  projected once per source (attention.project_keys).

layers="torch" builds the same model (same parameter names: state_dict loads both ways) from torch.nn.LSTM/GRU
(stepped by calling the module on one token with hx) and the attention modules' composed_forward (plain composed
PyTorch): what a user writes without seqkern, the baseline of the tests and the benchmark.

Beam search ranks hypotheses by the GNMT length penalty (Wu et al. 2016): score = log p(y) / ((5 + |y|) / 6)^alpha,
alpha = length_penalty (0: the plain total log-prob), |y| counting eos. Finished hypotheses stay in the beam with
their score frozen (pad appended) and compete with the live ones at every step; the search stops when every
hypothesis has finished or at max_len. Decoding does not switch the model to eval(): call model.eval() first
(dropout otherwise stays active).
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern.nn
from seqkern._checks import DTypeError, ShapeError, check_size, check_tensor
from seqkern.models._stack import check_token_ids
from seqkern.nn._recurrent import split_weights
from seqkern.ops.gru import gru_cell
from seqkern.ops.lstm import lstm_cell

RNNS = ("lstm", "gru")
ATTENTIONS = ("additive", "dot", "general", "concat", None)
LAYERS = ("seqkern", "torch")
_RECURRENT = {
    "seqkern": {"lstm": seqkern.nn.LSTM, "gru": seqkern.nn.GRU},
    "torch": {"lstm": nn.LSTM, "gru": nn.GRU},
}

# A decoder state: (h,) for a GRU, (h, c) for an LSTM, each (num_layers, rows, H).
State = tuple[Tensor, ...]


class Seq2SeqOutput(NamedTuple):
    """logits (B, T, tgt_vocab); attention (B, T, S) weights of every target position, or None."""

    logits: Tensor
    attention: Tensor | None


class Decoded(NamedTuple):
    """tokens (B, L) int64 (eos included, pad_id after it); lengths (B,) int64 including eos; scores (B,) the total
    log-prob (beam search: the length-normalized score it ranks by); attention (B, L, S), 0 after eos (None for
    the context-vector model, attention=None)."""

    tokens: Tensor
    lengths: Tensor
    scores: Tensor
    attention: Tensor | None


class _Source(NamedTuple):
    """What every decoder step reads of the encoded source: memory (rows, S, D*H), key_padding_mask (rows, S)
    bool, projected keys (attention.project_keys(memory); None without attention)."""

    memory: Tensor
    mask: Tensor
    projected: Tensor | None

    def repeat(self, times: int) -> _Source:
        """Each row `times` times in a row (beam search's B*beam rows)."""
        return _Source(*(None if t is None else t.repeat_interleave(times, dim=0) for t in self))


class Seq2Seq(nn.Module):
    """A recurrent encoder-decoder with attention; see the module docstring for the architecture.

    forward(src (B,S) int, src_lengths (B,) int (CPU or src's device), tgt_in (B,T) int starting with bos_id,
    need_weights=False) -> Seq2SeqOutput(logits (B,T,tgt_vocab), attention (B,T,S) or None (always None for
    attention=None)): teacher forcing, the
    logits at t predict tgt_in[:, t + 1] (the caller's tgt_out[:, t]).
    greedy_decode(src, src_lengths, max_len) / beam_search(src, src_lengths, beam_size, max_len, length_penalty)
    -> Decoded.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, embed_dim: int = 128, hidden_size: int = 256,
                 num_layers: int = 1, rnn: str = "lstm", bidirectional: bool = True, attention: str = "additive",
                 attention_hidden: int | None = None, dropout: float = 0.0, input_feeding: bool = False,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, layers: str = "seqkern", device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_options(src_vocab_size, tgt_vocab_size, embed_dim, hidden_size, num_layers, rnn, bidirectional,
                       attention, attention_hidden, dropout, input_feeding, pad_id, bos_id, eos_id, layers)
        factory = {"device": device, "dtype": dtype}
        self.src_vocab_size, self.tgt_vocab_size, self.hidden_size = src_vocab_size, tgt_vocab_size, hidden_size
        self.num_layers, self.rnn, self.bidirectional, self.layers = num_layers, rnn, bidirectional, layers
        self.input_feeding, self.pad_id, self.bos_id, self.eos_id = input_feeding, pad_id, bos_id, eos_id
        memory_size = (2 if bidirectional else 1) * hidden_size
        self.src_embed = nn.Embedding(src_vocab_size, embed_dim, padding_idx=pad_id, **factory)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, embed_dim, padding_idx=pad_id, **factory)
        self.dropout = nn.Dropout(dropout)
        recurrent = _RECURRENT[layers][rnn]
        # Dropout acts between layers only: with one layer torch.nn warns about a non-zero value that does nothing.
        between = dropout if num_layers > 1 else 0.0
        self.encoder = recurrent(embed_dim, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                                 dropout=between, **factory)
        if bidirectional:
            self.bridge = nn.Linear(2 * hidden_size, hidden_size, **factory)
        decoder_input = embed_dim + (hidden_size if input_feeding else 0)
        self.decoder = recurrent(decoder_input, hidden_size, num_layers, batch_first=True, dropout=between, **factory)
        attention_hidden = attention_hidden or hidden_size
        if attention is None:
            self.attention = None
        elif attention == "additive":
            self.attention = seqkern.nn.AdditiveAttention(hidden_size, memory_size, attention_hidden, **factory)
        else:
            self.attention = seqkern.nn.LuongAttention(hidden_size, memory_size, attention,
                                                       hidden_size=attention_hidden, **factory)
        if attention is not None:
            self.combine = nn.Linear(memory_size + hidden_size, hidden_size, bias=False, **factory)
        self.output = nn.Linear(hidden_size, tgt_vocab_size, **factory)

    # --------------------------------------------------------------------------------------------------------
    # Teacher-forced training.
    # --------------------------------------------------------------------------------------------------------
    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, need_weights: bool = False) -> Seq2SeqOutput:
        self._check_source(src, src_lengths)
        check_token_ids("tgt_in", tgt_in, self.tgt_vocab_size, sys.maxsize)  # no length limit
        if tgt_in.shape[0] != src.shape[0] or tgt_in.shape[1] < 1:
            raise ShapeError(f"tgt_in: expected shape ({src.shape[0]}, T) with T >= 1 (batch as src), "
                             f"got {tuple(tgt_in.shape)}")
        if not isinstance(need_weights, bool):
            raise DTypeError(f"need_weights: expected a bool, got {type(need_weights).__name__}")
        source, state = self._encode(src, src_lengths)
        if self.input_feeding:
            return self._teacher_forced_steps(source, state, tgt_in, need_weights)
        x = self.dropout(self.tgt_embed(tgt_in))
        top, _ = self.decoder(x, state if self.rnn == "lstm" else state[0])
        context, weights = self._attend(top, source, need_weights)
        return Seq2SeqOutput(self._head(context, top)[1], weights)

    def _teacher_forced_steps(self, source: _Source, state: State, tgt_in: Tensor,
                              need_weights: bool) -> Seq2SeqOutput:
        """Input feeding: the target one token at a time through `_step`."""
        feed = self._first_feed(tgt_in.shape[0])
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            step_logits, state, feed, step_weights = self._step(state, tgt_in[:, t], feed, source, need_weights)
            logits.append(step_logits)
            weights.append(step_weights)
        return Seq2SeqOutput(torch.stack(logits, 1), torch.stack(weights, 1) if need_weights else None)

    # --------------------------------------------------------------------------------------------------------
    # The pieces both paths share.
    # --------------------------------------------------------------------------------------------------------
    def _encode(self, src: Tensor, src_lengths: Tensor) -> tuple[_Source, State]:
        """src (B,S), src_lengths (B,) -> the source the decoder attends to and the decoder's initial state."""
        length = src.shape[1]
        x = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, finals = self.encoder(packed)
        memory, _ = pad_packed_sequence(output, batch_first=True, total_length=length)
        mask = torch.arange(length, device=src.device) >= src_lengths.to(src.device).unsqueeze(1)
        finals = finals if self.rnn == "lstm" else (finals,)
        projected = None if self.attention is None else self.attention.project_keys(memory)
        return _Source(memory, mask, projected), self._bridge(finals)

    def _bridge(self, finals: State) -> State:
        """The encoder's final states (L*D, B, H) -> the decoder's initial states (L, B, H)."""
        if not self.bidirectional:
            return tuple(finals)
        layers, batch, hidden = self.num_layers, finals[0].shape[1], self.hidden_size
        # (L*2, B, H), layer-major with the forward direction first -> (L, B, [h_fwd; h_bwd]).
        return tuple(torch.tanh(self.bridge(s.view(layers, 2, batch, hidden).transpose(1, 2)
                                            .reshape(layers, batch, 2 * hidden))) for s in finals)

    def _attend(self, query: Tensor, source: _Source, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """query (rows, Lq, H) -> (context (rows, Lq, D*H), weights (rows, Lq, S) or None); (None, None) for the
        context-vector model."""
        if self.attention is None:
            return None, None
        attend = self.attention if self.layers == "seqkern" else self.attention.composed_forward
        return attend(query, source.memory, None, source.mask, need_weights, projected_keys=source.projected)

    def _head(self, context: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
        """context (..., D*H), decoder output (..., H) -> (attentional vector h~ (..., H), logits (..., vocab)).
        Without attention (context None) the decoder output itself is what the output layer reads."""
        if context is None:
            return top, self.output(self.dropout(top))
        attentional = torch.tanh(self.combine(torch.cat([context, top], -1)))
        return attentional, self.output(self.dropout(attentional))

    def _first_feed(self, rows: int) -> Tensor | None:
        """h~_0 = 0 with input feeding, else nothing to feed."""
        if not self.input_feeding:
            return None
        return self.output.weight.new_zeros(rows, self.hidden_size)

    def _step(self, state: State, token: Tensor, feed: Tensor | None, source: _Source,
              need_weights: bool) -> tuple[Tensor, State, Tensor, Tensor | None]:
        """One decoder step: state (L, rows, H) each, token (rows,), feed h~_{t-1} (rows, H) or None
        -> (logits (rows, vocab), new state, the next step's feed (h~_t (rows, H) with input feeding, else None),
        attention weights (rows, S) or None)."""
        x = self.dropout(self.tgt_embed(token))
        if feed is not None:
            x = torch.cat([x, feed], -1)
        top, state = self._decoder_step(x, state)
        context, weights = self._attend(top.unsqueeze(1), source, need_weights)
        attentional, logits = self._head(None if context is None else context.squeeze(1), top)
        feed = attentional if self.input_feeding else None
        return logits, state, feed, None if weights is None else weights.squeeze(1)

    def _decoder_step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """x (rows, decoder input) through every decoder layer for one token -> (top output (rows, H), state)."""
        if self.layers == "torch":
            output, final = self.decoder(x.unsqueeze(1), state if self.rnn == "lstm" else state[0])
            return output.squeeze(1), final if self.rnn == "lstm" else (final,)
        # By name, not _flat_weights: that list keeps the tensors of construction time, which
        # torch.func.functional_call and torch.export swap out.
        weights = [getattr(self.decoder, name) for name in self.decoder._flat_weights_names]
        per_layer = len(weights) // self.num_layers
        layer_states = []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh, _ = split_weights(weights[layer * per_layer:(layer + 1) * per_layer])
            h = state[0][layer]
            if self.rnn == "lstm":
                layer_states.append(lstm_cell(F.linear(x, w_ih), F.linear(h, w_hh), state[1][layer], b_ih, b_hh))
            else:
                layer_states.append((gru_cell(F.linear(x, w_ih), F.linear(h, w_hh), h, b_ih, b_hh),))
            x = layer_states[-1][0]
            if layer < self.num_layers - 1:
                x = F.dropout(x, self.decoder.dropout, self.training)
        return x, tuple(torch.stack(parts) for parts in zip(*layer_states))

    # --------------------------------------------------------------------------------------------------------
    # Decoding.
    # --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_lengths: Tensor, max_len: int) -> Decoded:
        """The most likely token at every step, up to eos or max_len tokens -> Decoded (scores: total log-prob)."""
        self._check_source(src, src_lengths)
        check_size("max_len", max_len)
        source, state = self._encode(src, src_lengths)
        batch = src.shape[0]
        token = src.new_full((batch,), self.bos_id, dtype=torch.int64)
        feed = self._first_feed(batch)
        tokens = src.new_full((batch, max_len), self.pad_id, dtype=torch.int64)
        attention = self._attention_buffer(source, batch, max_len)
        scores = source.memory.new_zeros(batch)
        lengths = src.new_zeros(batch, dtype=torch.int64)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
        for t in range(max_len):
            logits, state, feed, weights = self._step(state, token, feed, source, True)
            log_probs = logits.log_softmax(-1)
            token = log_probs.argmax(-1)
            scores += log_probs.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
            token = token.masked_fill(finished, self.pad_id)
            tokens[:, t] = token
            if attention is not None:
                attention[:, t] = weights.masked_fill(finished.unsqueeze(1), 0.0)
            lengths += (~finished).long()
            finished |= token == self.eos_id
            if bool(finished.all()):
                break
        return _trimmed(tokens, lengths, scores, attention)

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_lengths: Tensor, beam_size: int = 4, max_len: int = 100,
                    length_penalty: float = 1.0) -> Decoded:
        """Batched beam search over B*beam_size rows -> Decoded of the best hypothesis per sequence (scores: the
        length-normalized score, see the module docstring). beam_size=1 gives greedy_decode's tokens."""
        self._check_source(src, src_lengths)
        check_size("beam_size", beam_size)
        check_size("max_len", max_len)
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or length_penalty < 0:
            raise ShapeError(f"length_penalty: expected a number >= 0, got {length_penalty!r}")
        batch, beams, vocab = src.shape[0], beam_size, self.tgt_vocab_size
        source, state = self._encode(src, src_lengths)
        source = source.repeat(beams)
        state = tuple(s.repeat_interleave(beams, dim=1) for s in state)
        rows = batch * beams
        token = src.new_full((rows,), self.bos_id, dtype=torch.int64)
        feed = self._first_feed(rows)
        tokens = src.new_full((rows, max_len), self.pad_id, dtype=torch.int64)
        attention = self._attention_buffer(source, rows, max_len)
        # Only the first of each sequence's beams is live at the start: the others would duplicate it.
        scores = source.memory.new_full((batch, beams), float("-inf"))
        scores[:, 0] = 0.0
        lengths = src.new_zeros(batch, beams, dtype=torch.int64)
        finished = torch.zeros(batch, beams, dtype=torch.bool, device=src.device)
        # A finished hypothesis extends only with pad, at no cost: its score stays frozen.
        frozen = source.memory.new_full((vocab,), float("-inf"))
        frozen[self.pad_id] = 0.0
        first_row = torch.arange(batch, device=src.device).unsqueeze(1) * beams
        for t in range(max_len):
            logits, state, feed, weights = self._step(state, token, feed, source, True)
            log_probs = torch.where(finished.unsqueeze(-1), frozen, logits.log_softmax(-1).view(batch, beams, vocab))
            totals = (scores.unsqueeze(-1) + log_probs).view(batch, beams * vocab)
            grown = lengths + (~finished).long()
            ranks = totals.view(batch, beams, vocab) / _penalty(grown, length_penalty).unsqueeze(-1)
            choice = ranks.view(batch, beams * vocab).topk(beams, dim=-1).indices
            origin, token = choice // vocab, choice % vocab
            scores, lengths = totals.gather(1, choice), grown.gather(1, origin)
            was_finished = finished.gather(1, origin)
            token = token.masked_fill(was_finished, self.pad_id)
            finished = was_finished | (token == self.eos_id)
            picked = (first_row + origin).flatten()
            state = tuple(s.index_select(1, picked) for s in state)
            feed = None if feed is None else feed.index_select(0, picked)
            tokens = tokens.index_select(0, picked)
            token = token.flatten()
            tokens[:, t] = token
            if attention is not None:
                attention = attention.index_select(0, picked)
                attention[:, t] = weights.index_select(0, picked).masked_fill(was_finished.view(rows, 1), 0.0)
            if bool(finished.all()):
                break
        ranks = scores / _penalty(lengths, length_penalty)
        best = ranks.argmax(-1)
        best_row = first_row.squeeze(1) + best
        return _trimmed(tokens[best_row], lengths.gather(1, best.unsqueeze(1)).squeeze(1),
                        ranks.gather(1, best.unsqueeze(1)).squeeze(1), None if attention is None else attention[best_row])

    def _attention_buffer(self, source: _Source, rows: int, max_len: int) -> Tensor | None:
        """The (rows, max_len, S) attention weights decoding fills in; None for the context-vector model."""
        return None if self.attention is None else source.memory.new_zeros(rows, max_len, source.memory.shape[1])

    # --------------------------------------------------------------------------------------------------------
    # Argument checks.
    # --------------------------------------------------------------------------------------------------------
    def _check_source(self, src: Tensor, src_lengths: Tensor) -> None:
        """src (B, S) ids in the source vocabulary; src_lengths (B,) integer, 1 <= length <= S."""
        check_token_ids("src", src, self.src_vocab_size, sys.maxsize)  # no length limit
        check_tensor("src_lengths", src_lengths)
        if src_lengths.dtype.is_floating_point or src_lengths.is_complex() or src_lengths.dtype == torch.bool:
            raise DTypeError(f"src_lengths: expected an integer tensor, got {src_lengths.dtype}")
        if src_lengths.shape != (src.shape[0],):
            raise ShapeError(f"src_lengths: expected shape ({src.shape[0]},) (one length per row of src), "
                             f"got {tuple(src_lengths.shape)}")
        if src_lengths.device.type != "cpu" and src_lengths.device != src.device:
            raise DTypeError(f"src_lengths: expected a tensor on the CPU or on {src.device} (as src), "
                             f"got one on {src_lengths.device}")
        # Data-dependent: checked eagerly only (under torch.compile pack_padded_sequence's own check remains).
        if (src.shape[0] and not torch.compiler.is_compiling()
                and not bool(((src_lengths >= 1) & (src_lengths <= src.shape[1])).all())):
            raise ShapeError(f"src_lengths: expected lengths in [1, {src.shape[1]}] (src's length), got values "
                             f"from {int(src_lengths.min())} to {int(src_lengths.max())}")

    def extra_repr(self) -> str:
        return (f"rnn={self.rnn!r}, layers={self.layers!r}, input_feeding={self.input_feeding}, "
                f"pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id}")


def _penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT's length penalty ((5 + length) / 6)^alpha, in the scores' dtype by the caller's division."""
    return ((5.0 + lengths) / 6.0) ** alpha


def _trimmed(tokens: Tensor, lengths: Tensor, scores: Tensor, attention: Tensor) -> Decoded:
    """Cut the (rows, max_len) buffers to the longest decoded sequence."""
    longest = int(lengths.max()) if lengths.numel() else 0
    return Decoded(tokens[:, :longest], lengths, scores, None if attention is None else attention[:, :longest])


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_options(src_vocab_size, tgt_vocab_size, embed_dim, hidden_size, num_layers, rnn, bidirectional,
                   attention, attention_hidden, dropout, input_feeding, pad_id, bos_id, eos_id, layers) -> None:
    """The constructor's arguments, before any module is built."""
    _check_choice("rnn", rnn, RNNS)
    _check_choice("attention", attention, ATTENTIONS)
    _check_choice("layers", layers, LAYERS)
    for name, value in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size),
                        ("embed_dim", embed_dim), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        check_size(name, value)
    if attention_hidden is not None:
        check_size("attention_hidden", attention_hidden)
    for name, value in (("bidirectional", bidirectional), ("input_feeding", input_feeding)):
        if not isinstance(value, bool):
            raise DTypeError(f"{name}: expected a bool, got {type(value).__name__}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ShapeError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if attention is None and input_feeding:
        raise ValueError("input_feeding: feeds the attentional vector h~_t back into the decoder, which the "
                         "context-vector model (attention=None) does not have; use an attention or "
                         "input_feeding=False")
    if attention == "dot" and bidirectional:
        raise ShapeError(f"attention: the 'dot' score needs the memory width (2 * hidden_size = {2 * hidden_size} "
                         f"with bidirectional=True) to equal hidden_size={hidden_size}; use bidirectional=False or "
                         f"another score")
    for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        vocab = min(src_vocab_size, tgt_vocab_size) if name == "pad_id" else tgt_vocab_size
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ShapeError(f"{name}: expected an int in [0, {vocab}) (the {'vocabularies' if name == 'pad_id' else 'target vocabulary'}), "
                             f"got {value!r}")
