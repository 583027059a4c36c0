"""The LayerNorm GRU's Triton launchers: the persistent sequence kernels of kernels/layernorm_lstm.py with
IS_LSTM=False (one time loop, two cell plug-ins)."""
from __future__ import annotations

from ._recurrent import column_sums
from .layernorm_lstm import sequence_backward, sequence_forward, weighted_column_sum


def layernorm_gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, eps,
                          lengths, resets, zoneout, zoneout_seed, reverse, save_workspace):
    output, (h_n,), workspace = sequence_forward(
        False, input, (h0,), w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, None, None,
        eps, lengths, resets, zoneout, zoneout_seed, reverse, save_workspace)
    return output, h_n, workspace


def layernorm_gru_backward(grad_output, grad_h_n, input, h0, w_ih, w_hh, ln_ih_weight, ln_hh_weight, output, workspace,
                           lengths, resets, zoneout, zoneout_seed, reverse):
    hidden = w_hh.shape[1]
    grad_input, (grad_h0,), grad_w_ih, grad_w_hh, d_post_x, d_post_h, _ = sequence_backward(
        False, grad_output, (grad_h_n,), input, (h0,), w_ih, w_hh, ln_ih_weight, ln_hh_weight, None, None, output,
        workspace, lengths, resets, zoneout, zoneout_seed, reverse)
    dtype = input.dtype
    return (grad_input, grad_h0, grad_w_ih.to(dtype), grad_w_hh.to(dtype), column_sums(d_post_x).to(dtype),
            column_sums(d_post_h).to(dtype), weighted_column_sum(d_post_x, workspace, 4 * hidden).to(dtype),
            weighted_column_sum(d_post_h, workspace, 7 * hidden).to(dtype))
