"""The schema of every seqkern op, declared once, in Python: torch.ops.seqkern.* exists whether or not the C++
kernels were built, so the fake implementations, the autograd formulas and the Triton kernels (CUDA tensors)
register without a C++ compiler. The C++ library (csrc/cpu/<op>.cpp) adds only CPU implementations
(TORCH_LIBRARY_IMPL(seqkern, CPU, m)); seqkern/ops/<op>.py registers the rest.

Conventions shared by the recurrent ops:
  * sequences are time-major: input (T, B, input_size);
  * batch_sizes (T,) int64 on the CPU, non-increasing, batch_sizes[t] <= B: at step t only rows
    [0, batch_sizes[t]) are active (a PackedSequence in sorted order). Inactive rows keep their state
    and get zeros in `output`. None means every row is active at every step;
  * lengths (B,) int64 on the input's device, values in [0, T], any order: row b is active at step t iff
    t < lengths[b] (and b < batch_sizes[t] with batch_sizes; the two are never given together). So a reverse
    direction starts each row from its initial state at its own last valid step t = lengths[b] - 1, and
    output, h_n, c_n are those of torch.nn on pack_padded_sequence(input, lengths, enforce_sorted=False);
  * resets (T,B) bool on the input's device: where resets[t, b], the state entering step t of row b is its
    initial state (h0, c0) again (an episode or document boundary). Forward direction only: reverse=true with
    resets is refused;
  * zoneout in [0, 1] (LSTM: on h and c, independent masks; GRU: on h), applied to the state an active row
    leaves a step with, before it is recorded in output (and the workspace): with zoneout_seed (an int64
    tensor of shape () on the input's device, training) each element keeps its value from before the step
    where keep(t, b, u) (a counter-based hash of the seed, so the backward redraws the mask instead of
    storing it), else takes the step's new value; without a seed (evaluation) the state is
    zoneout * before + (1 - zoneout) * new. seqkern/reference/_scan.py defines lengths, resets and keep bit
    for bit. zoneout = 0 is the plain layer. The ops' backward takes the same four arguments;
  * reverse=true runs t = T-1 ... 0 (the backward direction of a bidirectional layer);
  * tensors a flag leaves out (no workspace, no bias gradient, no projection) are returned empty, shape (0,).
"""
import torch

# Kept alive for the life of the process: dropping the Library object would delete the schemas.
LIBRARY = torch.library.Library("seqkern", "DEF")

# One LSTM layer in one direction over a whole sequence.
#   input (T,B,I), h0 (B,P), c0 (B,H), w_ih (4H,I), w_hh (4H,P), b_ih/b_hh (4H,), w_hr (P,H);
#   P = proj_size if w_hr is given, else H.  Gate order i, f, g, o, as torch.nn.LSTM.
#   -> output (T,B,P), h_n (B,P), c_n (B,H),
#      gates (T,B,4H) activated [sigmoid i, sigmoid f, tanh g, sigmoid o] and cells (T,B,H) = c_t,
#      both only when save_workspace (else empty): what lstm_backward needs.
LIBRARY.define(
    "lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, Tensor? lengths, Tensor? resets, float zoneout, "
    "Tensor? zoneout_seed, bool reverse, bool save_workspace) -> "
    "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)")
# Gradients of lstm_forward. grad_bias (4H,) is the gradient of b_ih and of b_hh alike (empty if
# not has_bias); grad_w_hr (P,H) is empty without a projection.
LIBRARY.define(
    "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, "
    "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor gates, Tensor cells, "
    "Tensor? batch_sizes, Tensor? lengths, Tensor? resets, float zoneout, Tensor? zoneout_seed, bool reverse, "
    "bool has_bias) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)")
# The fused pointwise part of one LSTM cell step, run on top of the two GEMMs
# gates_x = x @ w_ih^T and gates_h = h @ w_hh^T (both (B,4H)); cx (B,H).
#   -> hy (B,H), cy (B,H), workspace (B,4H) activated gates for the backward.
LIBRARY.define(
    "lstm_cell_forward(Tensor gates_x, Tensor gates_h, Tensor cx, Tensor? b_ih, Tensor? b_hh) -> "
    "(Tensor hy, Tensor cy, Tensor workspace)")
#   -> grad_gates (B,4H) (the gradient of gates_x and of gates_h alike), grad_cx (B,H),
#      grad_bias (4H,) (empty if not has_bias).
LIBRARY.define(
    "lstm_cell_backward(Tensor grad_hy, Tensor grad_cy, Tensor cx, Tensor cy, Tensor workspace, "
    "bool has_bias) -> (Tensor grad_gates, Tensor grad_cx, Tensor grad_bias)")

# One GRU layer in one direction over a whole sequence (PyTorch's reset-after form, gate order r, z, n).
#   input (T,B,I), h0 (B,H), w_ih (3H,I), w_hh (3H,H), b_ih/b_hh (3H,)
#   -> output (T,B,H), h_n (B,H), workspace (T,B,4H) = [r, z, n, h W_hn^T + b_hn] (empty unless save_workspace).
LIBRARY.define(
    "gru_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? batch_sizes, Tensor? lengths, Tensor? resets, float zoneout, Tensor? zoneout_seed, bool reverse, "
    "bool save_workspace) -> (Tensor output, Tensor h_n, Tensor workspace)")
LIBRARY.define(
    "gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, "
    "Tensor output, Tensor workspace, Tensor? batch_sizes, Tensor? lengths, Tensor? resets, float zoneout, "
    "Tensor? zoneout_seed, bool reverse, bool has_bias) -> (Tensor grad_input, "
    "Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)")
# The fused pointwise part of one GRU step on top of gates_x = x w_ih^T and gates_h = h w_hh^T (B,3H), hx (B,H)
#   -> hy (B,H), workspace (B,4H) as above.
LIBRARY.define(
    "gru_cell_forward(Tensor gates_x, Tensor gates_h, Tensor hx, Tensor? b_ih, Tensor? b_hh) -> "
    "(Tensor hy, Tensor workspace)")
#   -> grad_gates_x, grad_gates_h (B,3H) (they differ in the n gate), grad_hx (B,H), grad_b_ih, grad_b_hh (3H,).
LIBRARY.define(
    "gru_cell_backward(Tensor grad_hy, Tensor hx, Tensor workspace, bool has_bias) -> (Tensor grad_gates_x, "
    "Tensor grad_gates_h, Tensor grad_hx, Tensor grad_b_ih, Tensor grad_b_hh)")
# One Elman RNN layer in one direction: h' = act(x w_ih^T + b_ih + h w_hh^T + b_hh), act = relu if relu
# else tanh. input (T,B,I), h0 (B,H), w_ih (H,I), w_hh (H,H) -> output (T,B,H), h_n (B,H).
# The backward needs no workspace: the activation's derivative is read off the output.
LIBRARY.define(
    "rnn_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? batch_sizes, Tensor? lengths, Tensor? resets, bool reverse, bool relu) -> (Tensor output, Tensor h_n)")
#   grad_bias (H,) is the gradient of b_ih and of b_hh alike.
LIBRARY.define(
    "rnn_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, "
    "Tensor output, Tensor? batch_sizes, Tensor? lengths, Tensor? resets, bool reverse, bool relu, bool has_bias) "
    "-> (Tensor grad_input, "
    "Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)")
LIBRARY.define("rnn_cell_forward(Tensor gates_x, Tensor gates_h, Tensor? b_ih, Tensor? b_hh, bool relu) -> Tensor")
#   -> grad_preact (B,H) (the gradient of gates_x and of gates_h alike), grad_bias (H,).
LIBRARY.define("rnn_cell_backward(Tensor grad_hy, Tensor hy, bool relu, bool has_bias) -> (Tensor grad_preact, Tensor grad_bias)")

# The LayerNorm LSTM and GRU (issue 16; seqkern/reference/layernorm_lstm.py, layernorm_gru.py define them):
# one layer, one direction, whole sequence, with LN(v; w, b) over the gate columns of x W_ih^T and of h W_hh^T
# (and, for the LSTM, over the H units of c'), eps as given. Options of this round's recurrent ops
# (seqkern/reference/_scan.py defines them): lengths (B,) int64 in [0, T] (row b active at t < lengths[b];
# None: all T), resets (T,B) bool (the state entering step t is the initial one again; not with reverse),
# zoneout in [0, 1] with zoneout_seed an int64 tensor of shape () (training masks) or None (evaluation blend).
# A PackedSequence is given as its lengths. workspace is what the backward reads, in the accumulation dtype
# (float32 for bfloat16), empty unless save_workspace; its layout per (t, b) row is the kernels' business
# (the cells of csrc/cpu/layernorm_lstm.cpp and layernorm_gru.cpp document it; kernels/layernorm_lstm.py
# writes the same).
#   LSTM: input (T,B,I), h0, c0 (B,H), w_ih (4H,I), w_hh (4H,H), b_ih/b_hh (4H,), ln_ih_*/ln_hh_* (4H,),
#   ln_cell_* (H,) -> output (T,B,H), h_n, c_n (B,H), workspace (T,B,14H+3).
LIBRARY.define(
    "layernorm_lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh, Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_hh_weight, Tensor ln_hh_bias, "
    "Tensor ln_cell_weight, Tensor ln_cell_bias, float eps, Tensor? lengths, Tensor? resets, float zoneout, "
    "Tensor? zoneout_seed, bool reverse, bool save_workspace) -> "
    "(Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)")
# Gradients of layernorm_lstm_forward. grad_bias (4H,) is the gradient of b_ih, b_hh, ln_ih_bias and ln_hh_bias
# alike (all four are added to the same pre-activations).
LIBRARY.define(
    "layernorm_lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, "
    "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor ln_ih_weight, Tensor ln_hh_weight, Tensor ln_cell_weight, "
    "Tensor ln_cell_bias, Tensor output, Tensor workspace, Tensor? lengths, Tensor? resets, float zoneout, Tensor? zoneout_seed, "
    "bool reverse) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
    "Tensor grad_bias, Tensor grad_ln_ih_weight, Tensor grad_ln_hh_weight, Tensor grad_ln_cell_weight, "
    "Tensor grad_ln_cell_bias)")
#   GRU: input (T,B,I), h0 (B,H), w_ih (3H,I), w_hh (3H,H), b_ih/b_hh, ln_ih_*/ln_hh_* (3H,)
#   -> output (T,B,H), h_n (B,H), workspace (T,B,10H+2).
LIBRARY.define(
    "layernorm_gru_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_hh_weight, Tensor ln_hh_bias, float eps, Tensor? lengths, "
    "Tensor? resets, float zoneout, Tensor? zoneout_seed, bool reverse, bool save_workspace) -> "
    "(Tensor output, Tensor h_n, Tensor workspace)")
# Gradients of layernorm_gru_forward. grad_bias_x (3H,) is that of b_ih and ln_ih_bias alike, grad_bias_h of
# b_hh and ln_hh_bias.
LIBRARY.define(
    "layernorm_gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, "
    "Tensor w_hh, Tensor ln_ih_weight, Tensor ln_hh_weight, Tensor output, Tensor workspace, Tensor? lengths, "
    "Tensor? resets, float zoneout, Tensor? zoneout_seed, bool reverse) -> (Tensor grad_input, Tensor grad_h0, "
    "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias_x, Tensor grad_bias_h, Tensor grad_ln_ih_weight, "
    "Tensor grad_ln_hh_weight)")

# Scaled-dot-product attention, flash style: tiles of keys at a time with an online softmax, never the
# (Lq, Lk) score matrix. Memory is linear in the sequence lengths.
#   q (B,Hq,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv), one dtype, any strides with stride(-1) == 1;
#   Hq % Hkv == 0 and query head h reads kv head h / (Hq / Hkv) (grouped-/multi-query attention).
#   score(i, j) = scale * q_i . k_j + attn_mask[b, h, i, j]; attn_mask is additive, in q's dtype, of shape
#   (B,Hq,Lq,Lk) (zero strides where it broadcasts), stride(-1) == 1.
#   Variable lengths: with cu_seqlens_q and cu_seqlens_k ((N+1,) int32, non-decreasing, from 0), B == 1 and
#   sequence n owns rows [cu_seqlens_q[n], cu_seqlens_q[n+1]) of q and [cu_seqlens_k[n], cu_seqlens_k[n+1]) of k
#   and v; max_seqlen_q/k bound their lengths (ignored without cu_seqlens); attn_mask must be None.
#   Visibility, with i, j indices inside a sequence of lengths Lq_n, Lk_n and shift = bottom_right ? Lk_n - Lq_n : 0:
#   key j is seen by query i iff (window_left < 0 or j >= i + shift - window_left) and
#   (window_right < 0 or j <= i + shift + window_right). Causal attention is window_right = 0.
#   Dropout (dropout_p > 0; dropout_seed an int64 tensor of shape () on q's device): probability (i, j) of
#   head h in sequence n is kept iff dropout_bits(seed, n * Hq + h, i, j) >= dropout_threshold(dropout_p) and
#   then scaled by 1 / (1 - dropout_p); seqkern/reference/flash_attention.py defines both functions bit for bit.
#   -> out (B,Hq,Lq,Dv) contiguous, q's dtype; lse (B,Hq,Lq) contiguous, float64 whatever q's dtype (the
#   backward's exp(score - lse) of a saturated row's largest score needs more than float32's bits at
#   |lse| ~ 100): log sum_j exp(score(i, j)) over the visible keys. A row that sees no key (or only -inf
#   scores) has out = 0 and lse = -inf.
LIBRARY.define(
    "flash_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? cu_seqlens_q, "
    "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
    "bool bottom_right, float dropout_p, Tensor? dropout_seed) -> (Tensor out, Tensor lse)")
# Gradients of flash_attention_forward, the probabilities recomputed from the saved lse.
#   grad_out (B,Hq,Lq,Dv) any strides with stride(-1) == 1; out and lse as the forward returned them.
#   -> grad_q (B,Hq,Lq,D), grad_k (B,Hkv,Lk,D), grad_v (B,Hkv,Lk,Dv) contiguous (grad_k, grad_v summed over
#   the query heads that share a kv head); grad_scores (B,Hq,Lq,Lk) = dL/dscore(i, j) (the gradient of an
#   additive mask before its broadcast dims are summed) when want_grad_scores, else empty.
LIBRARY.define(
    "flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? attn_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
    "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, Tensor? dropout_seed, "
    "bool want_grad_scores) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_scores)")
# Decoding: a few queries against a long KV cache, the keys split into num_splits chunks processed in
# parallel and merged through their log-sum-exp (0 picks the split from the thread count and the lengths).
#   q (B,Hq,Lq,D), k_cache (B,Hkv,S,D), v_cache (B,Hkv,S,Dv), any strides with stride(-1) == 1, Hq % Hkv == 0;
#   cache_seqlens (B,) int32: sequence b has keys [0, cache_seqlens[b]) (None: all S). The queries are the
#   last Lq positions: query i of sequence b sits at p = cache_seqlens[b] - Lq + i; is_causal hides keys j > p,
#   window_left >= 0 hides keys j < p - window_left.
#   -> out (B,Hq,Lq,Dv) contiguous, q's dtype; lse (B,Hq,Lq), float64 for float64 inputs else float32. Not
#   differentiable.
LIBRARY.define(
    "flash_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? cache_seqlens, float scale, "
    "bool is_causal, int window_left, int num_splits) -> (Tensor out, Tensor lse)")

# Additive (Bahdanau) attention, flash style: score(i, j) = v . tanh(query_proj_i + key_proj_j) is computed a
# tile of keys at a time with an online softmax, never the (B,Lq,Lk,H) tanh tensor the composed version builds.
# The projections (query W_q^T, keys W_k^T) are ordinary GEMMs left to the caller, so a decoder projects its
# source keys once for every step.
#   query_proj (B,Lq,H), key_proj (B,Lk,H), values (B,Lk,Dv): one dtype, any strides with stride(-1) == 1;
#   v (H,) contiguous, same dtype; key_padding_mask (B,Lk) bool, contiguous, True where key j is padding.
#   -> out (B,Lq,Dv) contiguous, the inputs' dtype: sum_j p(i, j) values_j;
#      lse (B,Lq) contiguous, float64 for float64 inputs else float32: log sum_j exp(score(i, j)) over the
#      keys that are not padding;
#      weights (B,Lq,Lk) contiguous, lse's dtype: p(i, j) = exp(score(i, j) - lse_i) (0 at padding) when
#      return_weights, else empty. (Autograd asks for them: the backward reads p instead of recomputing the
#      scores, one tanh pass saved for B*Lq*Lk floats of memory.)
#   A row whose keys are all padding (or Lk == 0) has out = 0, lse = -inf and weights 0.
LIBRARY.define(
    "additive_attention_forward(Tensor query_proj, Tensor key_proj, Tensor values, Tensor v, "
    "Tensor? key_padding_mask, bool return_weights) -> (Tensor out, Tensor lse, Tensor weights)")
# Gradients of additive_attention_forward from the probabilities it returned.
#   grad_out (B,Lq,Dv) any strides with stride(-1) == 1; grad_weights (B,Lq,Lk) contiguous in the weights'
#   dtype or None: the gradient reaching the returned weights; out and weights as the forward returned them.
#   With ds(i, j) = p(i, j) (grad_out_i . values_j + grad_weights(i, j) - delta_i),
#   delta_i = grad_out_i . out_i + sum_j p(i, j) grad_weights(i, j), and t = tanh(query_proj_i + key_proj_j):
#   -> grad_query_proj (B,Lq,H) = sum_j ds(i, j) v * (1 - t^2), grad_key_proj (B,Lk,H) = sum_i of the same,
#      grad_values (B,Lk,Dv) = sum_i p(i, j) grad_out_i, grad_v (H,) = sum_ij ds(i, j) t; contiguous, the
#      inputs' dtype.
LIBRARY.define(
    "additive_attention_backward(Tensor grad_out, Tensor? grad_weights, Tensor query_proj, Tensor key_proj, "
    "Tensor values, Tensor v, Tensor out, Tensor weights) -> (Tensor grad_query_proj, Tensor grad_key_proj, "
    "Tensor grad_values, Tensor grad_v)")
