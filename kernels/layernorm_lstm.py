"""The LayerNorm LSTM's Triton kernels, and the persistent sequence kernels it shares with the LayerNorm GRU
(kernels/layernorm_gru.py launches them with IS_LSTM=False): one cell plug-in per op inside one time loop.

Shape of a launch (as kernels/_recurrent.py's): the x side LN(x W_ih^T) * ln_ih + bias for all T*B rows is
computed by torch before the launch (it has no recurrence); ONE persistent launch then walks the T steps, a
program per block of 16 batch rows holding whole hidden rows and all G gate tiles, so the LayerNorm of the G*H
columns of h W_hh^T is a reduction inside the program. States live in ACC registers; h_{t-1}, the left operand
of the recurrent GEMM, is also kept in an ACC buffer in memory. Options are compile-time flags: HAS_LENGTHS,
HAS_RESETS, ZONEOUT (0 none, 1 evaluation blend, 2 training masks from the counter-based hash), REVERSE,
SAVE_WORKSPACE. The workspace layout is csrc/cpu/layernorm_*.cpp's (the backward op accepts either backend's).
The weight, bias and LayerNorm-parameter gradients are torch GEMMs and sums over all T*B rows after the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._hash import _head_key, _mix
from ._launch import launch
from ._recurrent import (accumulate_matmul, column_sums, kernel_dtypes, reset_rows, sequence_blocks, sequence_grid,
                         sigmoid, sm_count, store, tanh)


# ==================================================================================================
# Device helpers.
# ==================================================================================================
@triton.jit
def _workspace_layout(H, IS_LSTM: tl.constexpr):
    """(width, offset of the normalized x side, of the normalized h side, of the rstd pair): see the C++ cells."""
    if IS_LSTM:
        return 14 * H + 3, 4 * H, 8 * H, 14 * H
    return 10 * H + 2, 4 * H, 7 * H, 10 * H


@triton.jit
def _masked_sum(x, hid_mask):
    return tl.sum(tl.where(hid_mask[None, :], x, 0), 1)


@triton.jit
def _row_stats(a, b, c, d, hid_mask, N, eps, IS_LSTM: tl.constexpr):
    """Mean and 1/sqrt(var + eps) over the G gate tiles of each row (d unused for the GRU), N = G*H."""
    total = _masked_sum(a, hid_mask) + _masked_sum(b, hid_mask) + _masked_sum(c, hid_mask)
    if IS_LSTM:
        total += _masked_sum(d, hid_mask)
    mean = total / N
    sq = (_masked_sum((a - mean[:, None]) * (a - mean[:, None]), hid_mask)
          + _masked_sum((b - mean[:, None]) * (b - mean[:, None]), hid_mask)
          + _masked_sum((c - mean[:, None]) * (c - mean[:, None]), hid_mask))
    if IS_LSTM:
        sq += _masked_sum((d - mean[:, None]) * (d - mean[:, None]), hid_mask)
    return mean, 1 / tl.sqrt(sq / N + eps)


@triton.jit
def _ln_backward(dy, hat, w, mean_g, mean_gh, rstd):
    """One gate tile's gradient of v in LN(v) * w + b: rstd (dy w - mean(dy w) - hat mean(dy w hat))."""
    return (dy * w[None, :] - mean_g[:, None] - hat * mean_gh[:, None]) * rstd[:, None]


@triton.jit
def _ln_backward_means(da, db, dc, dd, ha, hb, hc, hd, wa, wb, wc, wd, hid_mask, N, IS_LSTM: tl.constexpr):
    """mean(dy w) and mean(dy w hat) over the G gate tiles of each row."""
    g = _masked_sum(da * wa[None, :], hid_mask) + _masked_sum(db * wb[None, :], hid_mask) + _masked_sum(dc * wc[None, :], hid_mask)
    gh = (_masked_sum(da * wa[None, :] * ha, hid_mask) + _masked_sum(db * wb[None, :] * hb, hid_mask)
          + _masked_sum(dc * wc[None, :] * hc, hid_mask))
    if IS_LSTM:
        g += _masked_sum(dd * wd[None, :], hid_mask)
        gh += _masked_sum(dd * wd[None, :] * hd, hid_mask)
    return g / N, gh / N


@triton.jit
def _load_vec(ptr, hid, hid_mask, ACC: tl.constexpr):
    return tl.load(ptr + hid, mask=hid_mask, other=0).to(ACC)


@triton.jit
def _load_gate_vecs(ptr, hid, hid_mask, H, ACC: tl.constexpr, IS_LSTM: tl.constexpr):
    """The slice `hid` of each gate block of a (G*H,) vector: 4 blocks for the LSTM, 3 and zeros for the GRU."""
    v0 = _load_vec(ptr, hid, hid_mask, ACC)
    v1 = _load_vec(ptr + H, hid, hid_mask, ACC)
    v2 = _load_vec(ptr + 2 * H, hid, hid_mask, ACC)
    v3 = v2 * 0
    if IS_LSTM:
        v3 = _load_vec(ptr + 3 * H, hid, hid_mask, ACC)
    return v0, v1, v2, v3


@triton.jit
def _gate_affine(ln_w_ptr, ln_b_ptr, bias_h_ptr, hid, hid_mask, H, ACC: tl.constexpr, IS_LSTM: tl.constexpr,
                 HAS_BIAS_H: tl.constexpr):
    """The slice `hid` of LN(h W_hh^T)'s affine per gate: weights w0..w3 and shifts b0..b3 (bias_h, added after the
    LayerNorm, folded into the shifts of the first three gates)."""
    w0, w1, w2, w3 = _load_gate_vecs(ln_w_ptr, hid, hid_mask, H, ACC, IS_LSTM)
    b0, b1, b2, b3 = _load_gate_vecs(ln_b_ptr, hid, hid_mask, H, ACC, IS_LSTM)
    if HAS_BIAS_H:
        b0 += _load_vec(bias_h_ptr, hid, hid_mask, ACC)
        b1 += _load_vec(bias_h_ptr + H, hid, hid_mask, ACC)
        b2 += _load_vec(bias_h_ptr + 2 * H, hid, hid_mask, ACC)
    return w0, w1, w2, w3, b0, b1, b2, b3


@triton.jit
def _cell_gates(gx_ptr, row_offsets, H, keep, a0, a1, a2, a3, w0, w1, w2, w3, b0, b1, b2, b3, ACC: tl.constexpr,
                IS_LSTM: tl.constexpr):
    """The gates from the normalized hidden products a0..a3 (LN(h W_hh^T) before its affine, _gate_affine's w, b)
    and the x side gx at row_offsets (_gate_tile), which are also the workspace's first four blocks: the LSTM's
    i, f, g, o; the GRU's r, z, the candidate n = tanh(x_n + r n2) and n2, the hidden part r scales (a3 unused)."""
    n0 = a0 * w0[None, :] + b0[None, :]
    n1 = a1 * w1[None, :] + b1[None, :]
    n2 = a2 * w2[None, :] + b2[None, :]
    g0 = sigmoid(_gate_tile(gx_ptr, row_offsets, 0, H, keep, ACC) + n0)
    g1 = sigmoid(_gate_tile(gx_ptr, row_offsets, 1, H, keep, ACC) + n1)
    x2 = _gate_tile(gx_ptr, row_offsets, 2, H, keep, ACC)
    if IS_LSTM:
        g2 = tanh(x2 + n2)
        g3 = sigmoid(_gate_tile(gx_ptr, row_offsets, 3, H, keep, ACC) + a3 * w3[None, :] + b3[None, :])
    else:
        g2 = tanh(x2 + g0 * n2)
        g3 = n2
    return g0, g1, g2, g3


@triton.jit
def _normalized(ws_ptr, offsets, H, keep, ACC: tl.constexpr, IS_LSTM: tl.constexpr):
    """The G gate tiles of a saved normalized side (zeros for the GRU's fourth)."""
    v0 = _gate_tile(ws_ptr, offsets, 0, H, keep, ACC)
    v1 = _gate_tile(ws_ptr, offsets, 1, H, keep, ACC)
    v2 = _gate_tile(ws_ptr, offsets, 2, H, keep, ACC)
    v3 = v2 * 0
    if IS_LSTM:
        v3 = _gate_tile(ws_ptr, offsets, 3, H, keep, ACC)
    return v0, v1, v2, v3


@triton.jit
def _store_blocks(ptr, H, mask, v0, v1, v2, v3, FOURTH: tl.constexpr):
    """v0, v1, v2 (and v3 with FOURTH) into consecutive H-wide blocks of a workspace row: ptr + k H."""
    tl.store(ptr, v0, mask=mask)
    tl.store(ptr + H, v1, mask=mask)
    tl.store(ptr + 2 * H, v2, mask=mask)
    if FOURTH:
        tl.store(ptr + 3 * H, v3, mask=mask)


@triton.jit
def _active(t, rows, B, T, lengths_ptr, HAS_LENGTHS: tl.constexpr):
    """Rows active at time t: t < lengths[row] (and t inside the sequence)."""
    tt = rows * 0 + t  # a vector: the interpreter turns a block mask & a scalar into int32
    inside = (rows < B) & (tt >= 0) & (tt < T)
    if HAS_LENGTHS:
        return inside & (t < tl.load(lengths_ptr + rows, mask=rows < B, other=0))
    return inside


@triton.jit
def _zoneout_weight(seed_ptr, k, t, rows, hid, H, zoneout, keep_below, ACC: tl.constexpr, ZONEOUT: tl.constexpr):
    """The weight of the previous value of state k at (t, rows, hid): the 0/1 training mask (ZONEOUT == 2) from
    dropout_bits(seed, k, t, row * H + unit) < keep_below, or zoneout itself (evaluation blend)."""
    if ZONEOUT == 2:
        row_key = _mix(_head_key(seed_ptr, tl.full((), k, tl.int32)) ^ (t + tl.zeros((), tl.int32)).to(tl.uint32))
        column = (rows[:, None] * H + hid[None, :]).to(tl.uint32) * tl.full((), 0x9E3779B1, tl.uint32)
        bits = _mix(row_key ^ column)
        return tl.where(bits.to(tl.int64) < keep_below, 1.0, 0.0).to(ACC)
    return tl.zeros((rows.shape[0], hid.shape[0]), ACC) + zoneout


@triton.jit
def _blend(new, old, m, ZONEOUT: tl.constexpr):
    if ZONEOUT == 0:
        return new
    if ZONEOUT == 2:
        return tl.where(m != 0, old, new)  # a select: an Inf or NaN not kept must not leak through 0 * x
    return m * old + (1 - m) * new


@triton.jit
def _split_grad(d, m, ZONEOUT: tl.constexpr):
    """The gradient of a zoned-out state -> (that of the step's new value, that of the previous value)."""
    if ZONEOUT == 0:
        return d, d * 0
    if ZONEOUT == 2:
        return tl.where(m != 0, 0, d), tl.where(m != 0, d, 0)
    return (1 - m) * d, m * d


@triton.jit
def _gate_tile(ptr, offsets, gate, H, mask, ACC: tl.constexpr):
    return tl.load(ptr + offsets + gate * H, mask=mask, other=0).to(ACC)


# ==================================================================================================
# Whole-sequence kernels. Grid: (batch blocks,); each program runs every time step for its rows.
# ==================================================================================================
@triton.jit
def _hidden_gate_products(h_ptr, w_hh_ptr, H, rows, active, units, umask, IS_LSTM: tl.constexpr, ACC: tl.constexpr,
                          DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} W_hh^T at columns `units` of each gate block (H rows of W_hh at a time): (p0, p1, p2, p3), p3 = p2
    for the GRU. All H units in the row-block kernel, a program's BLOCK_U in the split one."""
    p0 = accumulate_matmul(tl.zeros((BLOCK_B, BLOCK_U), ACC), h_ptr, H, rows, active, w_hh_ptr, 1, H, units, umask,
                           H, DOT, BLOCK_K)
    p1 = accumulate_matmul(tl.zeros((BLOCK_B, BLOCK_U), ACC), h_ptr, H, rows, active, w_hh_ptr + H * H, 1, H, units,
                           umask, H, DOT, BLOCK_K)
    p2 = accumulate_matmul(tl.zeros((BLOCK_B, BLOCK_U), ACC), h_ptr, H, rows, active, w_hh_ptr + 2 * H * H, 1, H,
                           units, umask, H, DOT, BLOCK_K)
    p3 = p2
    if IS_LSTM:
        p3 = accumulate_matmul(tl.zeros((BLOCK_B, BLOCK_U), ACC), h_ptr, H, rows, active, w_hh_ptr + 3 * H * H, 1, H,
                               units, umask, H, DOT, BLOCK_K)
    return p0, p1, p2, p3


@triton.jit(do_not_specialize=["T"])
def _layernorm_sequence_forward_kernel(
    gx_ptr,  # (T,B,G*H) ACC: the finished x side
    w_hh_ptr, ln_w_ptr, ln_b_ptr, bias_h_ptr,  # (G*H,H); (G*H,) LN(h W_hh^T) affine; (G*H,) added after it or None
    cell_w_ptr, cell_b_ptr,  # (H,) ln_cell (LSTM)
    lengths_ptr, resets_ptr, seed_ptr,  # (B,) int64, (T,B) bool, () int64, each if its flag
    h0_ptr, c0_ptr,  # (B,H) ACC
    h_ptr, c_ptr,  # (B,H) ACC: h0 / c0 on entry, the final states on exit; h_ptr is the GEMM operand
    output_ptr,  # out (T,B,H), the storage dtype
    ws_ptr,  # out (T,B,W) ACC if SAVE_WORKSPACE
    T, B, H, eps, zoneout, keep_below,
    IS_LSTM: tl.constexpr, HAS_BIAS_H: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr, REVERSE: tl.constexpr, SAVE_WORKSPACE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    hid = tl.arange(0, BLOCK_H)
    hid_mask = hid < H
    state_mask = (rows < B)[:, None] & hid_mask[None, :]
    state_offsets = rows[:, None] * H + hid[None, :]
    G = 4 if IS_LSTM else 3
    W, _, HHAT, RSTD = _workspace_layout(H, IS_LSTM)
    h = tl.load(h_ptr + state_offsets, mask=state_mask, other=0)
    c = tl.load(c_ptr + state_offsets, mask=state_mask, other=0)
    h0 = h
    c0 = c
    lw0, lw1, lw2, lw3, lb0, lb1, lb2, lb3 = _gate_affine(ln_w_ptr, ln_b_ptr, bias_h_ptr, hid, hid_mask, H, ACC,
                                                          IS_LSTM, HAS_BIAS_H)

    for step in range(T):
        t = T - 1 - step if REVERSE else step
        if HAS_RESETS:
            reset = reset_rows(t, rows, B, resets_ptr, HAS_RESETS)[:, None] & state_mask
            h = tl.where(reset, h0, h)
            c = tl.where(reset, c0, c)
            tl.debug_barrier()
            tl.store(h_ptr + state_offsets, h, mask=reset)
            tl.debug_barrier()
        active = _active(t, rows, B, T, lengths_ptr, HAS_LENGTHS)
        keep = active[:, None] & hid_mask[None, :]
        row_offsets = (t * B + rows)[:, None] * (G * H) + hid[None, :]
        p0, p1, p2, p3 = _hidden_gate_products(h_ptr, w_hh_ptr, H, rows, active, hid, hid_mask, IS_LSTM, ACC, DOT,
                                               BLOCK_B, BLOCK_H, BLOCK_K)
        mean, rstd_h = _row_stats(p0, p1, p2, p3, hid_mask, G * H, eps, IS_LSTM)
        a0 = (p0 - mean[:, None]) * rstd_h[:, None]
        a1 = (p1 - mean[:, None]) * rstd_h[:, None]
        a2 = (p2 - mean[:, None]) * rstd_h[:, None]
        a3 = (p3 - mean[:, None]) * rstd_h[:, None]
        g0, g1, g2, g3 = _cell_gates(gx_ptr, row_offsets, H, keep, a0, a1, a2, a3, lw0, lw1, lw2, lw3, lb0, lb1,
                                     lb2, lb3, ACC, IS_LSTM)
        ws_offsets = (t * B + rows)[:, None] * W + hid[None, :]
        if IS_LSTM:
            c_new = g1 * c + g0 * g2  # f c + i g
            c_mean = _masked_sum(c_new, hid_mask) / H
            c_centered = tl.where(hid_mask[None, :], c_new - c_mean[:, None], 0)
            rstd_c = 1 / tl.sqrt(_masked_sum(c_centered * c_centered, hid_mask) / H + eps)
            c_hat = c_centered * rstd_c[:, None]
            h_new = g3 * tanh(c_hat * _load_vec(cell_w_ptr, hid, hid_mask, ACC)[None, :]
                              + _load_vec(cell_b_ptr, hid, hid_mask, ACC)[None, :])  # o tanh(LN(c'))
            h_new = _blend(h_new, h, _zoneout_weight(seed_ptr, 0, t, rows, hid, H, zoneout, keep_below, ACC, ZONEOUT),
                           ZONEOUT)
            c_new = _blend(c_new, c, _zoneout_weight(seed_ptr, 1, t, rows, hid, H, zoneout, keep_below, ACC, ZONEOUT),
                           ZONEOUT)
            if SAVE_WORKSPACE:
                tl.store(ws_ptr + ws_offsets + 12 * H, c_hat, mask=keep)
                tl.store(ws_ptr + ws_offsets + 13 * H, c_new, mask=keep)
                tl.store(ws_ptr + (t * B + rows) * W + RSTD + 2, rstd_c, mask=active)
        else:
            h_new = (1 - g1) * g2 + g1 * h  # (1 - z) n + z h
            h_new = _blend(h_new, h, _zoneout_weight(seed_ptr, 0, t, rows, hid, H, zoneout, keep_below, ACC, ZONEOUT),
                           ZONEOUT)
        if SAVE_WORKSPACE:
            _store_blocks(ws_ptr + ws_offsets, H, keep, g0, g1, g2, g3, True)
            _store_blocks(ws_ptr + ws_offsets + HHAT, H, keep, a0, a1, a2, a3, IS_LSTM)
            tl.store(ws_ptr + (t * B + rows) * W + RSTD + 1, rstd_h, mask=active)
        h = tl.where(keep, h_new, h)
        if IS_LSTM:
            c = tl.where(keep, c_new, c)
        tl.debug_barrier()  # every thread has read h_{t-1} before h_t overwrites it
        store(output_ptr + (t * B + rows)[:, None] * H + hid[None, :], tl.where(keep, h, 0), state_mask)
        tl.store(h_ptr + state_offsets, h, mask=keep)
        tl.debug_barrier()
    tl.store(c_ptr + state_offsets, c, mask=state_mask)


@triton.jit
def _cell_backward(ws_ptr, output_ptr, h0_ptr, c0_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, d_c, t, t_prev, B, H,
                   zoneout, keep_below, rows, units, umask, continues, active, keep, c_means,
                   IS_LSTM: tl.constexpr, ZONEOUT: tl.constexpr, ACC: tl.constexpr):
    """The cell backward of units `units` of rows `rows` (all H in the row-block kernel, BLOCK_U in a split program),
    with the LSTM's LN(c') row means given (_lstm_cell_sums over the whole row / H):
    -> (px0..px3: the gradients of the normalized x side, ph0..ph3: of the h side, the new grad c, d_nc, the
    unit-local part of grad h_{t-1}, h_{t-1})."""
    W, _, _, RSTD = _workspace_layout(H, IS_LSTM)
    state_mask = (rows < B)[:, None] & umask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    from_record = continues[:, None] & umask[None, :]
    h_prev = tl.where(from_record, tl.load(output_ptr + (t_prev * B + rows)[:, None] * H + units[None, :],
                                           mask=from_record, other=0).to(ACC),
                      tl.load(h0_ptr + state_offsets, mask=state_mask, other=0))
    h_prev = tl.where(keep, h_prev, 0)
    ws_offsets = (t * B + rows)[:, None] * W + units[None, :]
    dn_h, dk_h = _split_grad(d_h, _zoneout_weight(seed_ptr, 0, t, rows, units, H, zoneout, keep_below, ACC, ZONEOUT),
                             ZONEOUT)
    if IS_LSTM:
        dn_c, dk_c = _split_grad(d_c, _zoneout_weight(seed_ptr, 1, t, rows, units, H, zoneout, keep_below, ACC,
                                                      ZONEOUT), ZONEOUT)
        c_prev = tl.where(from_record, tl.load(ws_ptr + (t_prev * B + rows)[:, None] * W + 13 * H + units[None, :],
                                               mask=from_record, other=0),
                          tl.load(c0_ptr + state_offsets, mask=state_mask, other=0))
        i = _gate_tile(ws_ptr, ws_offsets, 0, H, keep, ACC)
        f = _gate_tile(ws_ptr, ws_offsets, 1, H, keep, ACC)
        g = _gate_tile(ws_ptr, ws_offsets, 2, H, keep, ACC)
        o = _gate_tile(ws_ptr, ws_offsets, 3, H, keep, ACC)
        c_hat = _gate_tile(ws_ptr, ws_offsets, 12, H, keep, ACC)
        rstd_c = tl.load(ws_ptr + (t * B + rows) * W + RSTD + 2, mask=active, other=0)
        cw = _load_vec(cell_w_ptr, units, umask, ACC)
        tn = tanh(c_hat * cw[None, :] + _load_vec(cell_b_ptr, units, umask, ACC)[None, :])
        d_o = dn_h * tn * o * (1 - o)
        d_nc = tl.where(keep, dn_h * o * (1 - tn * tn), 0)
        gc = d_nc * cw[None, :]
        mean_g, mean_gh = c_means
        d_cn = (gc - mean_g[:, None] - c_hat * mean_gh[:, None]) * rstd_c[:, None] + dn_c
        px0 = d_cn * g * i * (1 - i)
        px1 = d_cn * c_prev * f * (1 - f)
        px2 = d_cn * i * (1 - g * g)
        px3 = d_o
        ph0, ph1, ph2, ph3 = px0, px1, px2, px3
        d_c = tl.where(keep, dk_c + d_cn * f, d_c)
        direct_h = dk_h
    else:
        d_nc = d_h * 0
        r = _gate_tile(ws_ptr, ws_offsets, 0, H, keep, ACC)
        z = _gate_tile(ws_ptr, ws_offsets, 1, H, keep, ACC)
        cand = _gate_tile(ws_ptr, ws_offsets, 2, H, keep, ACC)
        gh_n = _gate_tile(ws_ptr, ws_offsets, 3, H, keep, ACC)
        d_n = dn_h * (1 - z) * (1 - cand * cand)
        px0 = d_n * gh_n * r * (1 - r)
        px1 = dn_h * (h_prev - cand) * z * (1 - z)
        px2 = d_n
        px3 = d_n * 0
        ph0, ph1, ph2, ph3 = px0, px1, d_n * r, px3
        direct_h = dk_h + dn_h * z
    return (tl.where(keep, px0, 0), tl.where(keep, px1, 0), tl.where(keep, px2, 0), tl.where(keep, px3, 0),
            tl.where(keep, ph0, 0), tl.where(keep, ph1, 0), tl.where(keep, ph2, 0), tl.where(keep, ph3, 0),
            d_c, d_nc, direct_h, h_prev)


@triton.jit
def _lstm_cell_sums(ws_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, t, B, H, zoneout, keep_below, rows, units, umask,
                    keep, ZONEOUT: tl.constexpr, ACC: tl.constexpr):
    """Sums over units `units` of d_nc w and d_nc w c_hat (LN(c')'s backward): the row's in the row-block kernel,
    a split program's partial ones (merged across programs by the split backward)."""
    W, _, _, _ = _workspace_layout(H, True)
    ws_offsets = (t * B + rows)[:, None] * W + units[None, :]
    dn_h, _ = _split_grad(d_h, _zoneout_weight(seed_ptr, 0, t, rows, units, H, zoneout, keep_below, ACC, ZONEOUT),
                          ZONEOUT)
    o = _gate_tile(ws_ptr, ws_offsets, 3, H, keep, ACC)
    c_hat = _gate_tile(ws_ptr, ws_offsets, 12, H, keep, ACC)
    cw = _load_vec(cell_w_ptr, units, umask, ACC)
    tn = tanh(c_hat * cw[None, :] + _load_vec(cell_b_ptr, units, umask, ACC)[None, :])
    gc = tl.where(keep, dn_h * o * (1 - tn * tn), 0) * cw[None, :]
    return _masked_sum(gc, umask), _masked_sum(gc * c_hat, umask)


@triton.jit(do_not_specialize=["T"])
def _layernorm_sequence_backward_kernel(
    grad_output_ptr,  # (T,B,H)
    output_ptr, ws_ptr,  # the forward's (T,B,H) output and (T,B,W) ACC workspace
    w_hh_ptr, ln_ih_w_ptr, ln_hh_w_ptr, cell_w_ptr, cell_b_ptr,
    lengths_ptr, resets_ptr, seed_ptr,
    h0_ptr, c0_ptr,  # (B,H) ACC
    d_h_ptr, d_c_ptr,  # (B,H) ACC: grad_h_n / grad_c_n on entry, grad_h0 / grad_c0 on exit
    d_post_x_ptr, d_post_h_ptr,  # out (T,B,G*H) ACC: gradients of the two normalized sides (zero when inactive)
    d_gx_ptr, d_gh_ptr,  # out (T,B,G*H) ACC: gradients of x W_ih^T and h W_hh^T; d_gh re-read by the GEMM
    extra_ptr,  # out (T,B,H) ACC: the LSTM's gradient of LN(c')
    h_prev_ptr,  # out (T,B,H) ACC: the h each step read (zero when inactive)
    T, B, H, zoneout, keep_below,
    IS_LSTM: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    REVERSE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    hid = tl.arange(0, BLOCK_H)
    hid_mask = hid < H
    state_mask = (rows < B)[:, None] & hid_mask[None, :]
    state_offsets = rows[:, None] * H + hid[None, :]
    G = 4 if IS_LSTM else 3
    W, XHAT, HHAT, RSTD = _workspace_layout(H, IS_LSTM)
    d_h = tl.load(d_h_ptr + state_offsets, mask=state_mask, other=0)
    d_c = tl.load(d_c_ptr + state_offsets, mask=state_mask, other=0)
    d_h0 = d_h * 0
    d_c0 = d_h * 0
    wx0, wx1, wx2, wx3 = _load_gate_vecs(ln_ih_w_ptr, hid, hid_mask, H, ACC, IS_LSTM)
    wh0, wh1, wh2, wh3 = _load_gate_vecs(ln_hh_w_ptr, hid, hid_mask, H, ACC, IS_LSTM)

    for reverse_step in range(T):
        step = T - 1 - reverse_step
        t = T - 1 - step if REVERSE else step
        t_prev = t + 1 if REVERSE else t - 1
        active = _active(t, rows, B, T, lengths_ptr, HAS_LENGTHS)
        reset = reset_rows(t, rows, B, resets_ptr, HAS_RESETS)
        keep = active[:, None] & hid_mask[None, :]
        continues = _active(t_prev, rows, B, T, lengths_ptr, HAS_LENGTHS) & (reset == 0) & active
        d_h += tl.load(grad_output_ptr + (t * B + rows)[:, None] * H + hid[None, :], mask=keep, other=0).to(ACC)
        ws_offsets = (t * B + rows)[:, None] * W + hid[None, :]
        wide = (t * B + rows)[:, None] * (G * H) + hid[None, :]
        s_g = tl.zeros((BLOCK_B,), ACC)
        s_gh = s_g
        if IS_LSTM:
            s_g, s_gh = _lstm_cell_sums(ws_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, t, B, H, zoneout, keep_below,
                                        rows, hid, hid_mask, keep, ZONEOUT, ACC)
        px0, px1, px2, px3, ph0, ph1, ph2, ph3, d_c, d_nc, direct_h, h_prev = _cell_backward(
            ws_ptr, output_ptr, h0_ptr, c0_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, d_c, t, t_prev, B, H, zoneout,
            keep_below, rows, hid, hid_mask, continues, active, keep, (s_g / H, s_gh / H), IS_LSTM, ZONEOUT, ACC)
        tl.store(h_prev_ptr + (t * B + rows)[:, None] * H + hid[None, :], h_prev, mask=state_mask)
        if IS_LSTM:
            tl.store(extra_ptr + (t * B + rows)[:, None] * H + hid[None, :], d_nc, mask=state_mask)
        # LN backward on the x side and on the h side.
        x0, x1, x2, x3 = _normalized(ws_ptr, ws_offsets + XHAT, H, keep, ACC, IS_LSTM)
        rstd_x = tl.load(ws_ptr + (t * B + rows) * W + RSTD, mask=active, other=0)
        mg, mgh = _ln_backward_means(px0, px1, px2, px3, x0, x1, x2, x3, wx0, wx1, wx2, wx3, hid_mask, G * H, IS_LSTM)
        y0, y1, y2, y3 = _normalized(ws_ptr, ws_offsets + HHAT, H, keep, ACC, IS_LSTM)
        rstd_y = tl.load(ws_ptr + (t * B + rows) * W + RSTD + 1, mask=active, other=0)
        ng, ngh = _ln_backward_means(ph0, ph1, ph2, ph3, y0, y1, y2, y3, wh0, wh1, wh2, wh3, hid_mask, G * H, IS_LSTM)
        _store_blocks(d_post_x_ptr + wide, H, state_mask, px0, px1, px2, px3, IS_LSTM)
        _store_blocks(d_post_h_ptr + wide, H, state_mask, ph0, ph1, ph2, ph3, IS_LSTM)
        _store_blocks(d_gx_ptr + wide, H, state_mask, _ln_backward(px0, x0, wx0, mg, mgh, rstd_x),
                      _ln_backward(px1, x1, wx1, mg, mgh, rstd_x), _ln_backward(px2, x2, wx2, mg, mgh, rstd_x),
                      _ln_backward(px3, x3, wx3, mg, mgh, rstd_x), IS_LSTM)
        _store_blocks(d_gh_ptr + wide, H, state_mask, _ln_backward(ph0, y0, wh0, ng, ngh, rstd_y),
                      _ln_backward(ph1, y1, wh1, ng, ngh, rstd_y), _ln_backward(ph2, y2, wh2, ng, ngh, rstd_y),
                      _ln_backward(ph3, y3, wh3, ng, ngh, rstd_y), IS_LSTM)
        tl.debug_barrier()  # the whole gradient row is visible before the GEMM re-reads it
        rec = direct_h
        for gate in range(G):
            rec = accumulate_matmul(rec, d_gh_ptr + t * B * G * H + gate * H, G * H, rows, active,
                                    w_hh_ptr + gate * H * H, H, 1, hid, hid_mask, H, DOT, BLOCK_K)
        d_h = tl.where(keep, rec, d_h)
        reset_mask = reset[:, None] & state_mask
        d_h0 += tl.where(reset_mask, d_h, 0)
        d_c0 += tl.where(reset_mask, d_c, 0)
        d_h = tl.where(reset_mask, 0, d_h)
        d_c = tl.where(reset_mask, 0, d_c)

    tl.store(d_h_ptr + state_offsets, d_h0 + d_h, mask=state_mask)
    tl.store(d_c_ptr + state_offsets, d_c0 + d_c, mask=state_mask)


# ==================================================================================================
# Launchers shared by both ops (the op-specific signatures are below and in kernels/layernorm_gru.py).
# ==================================================================================================
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_tiles(hidden: int) -> dict:
    """Tiles, warps and stages of both kernels: kernels/_recurrent.py's sequence_blocks for float32, the dtype they
    compute in whatever the storage dtype. One pipeline stage: with triton's default 3 they spilled at hidden 64
    (24 bytes on sm_90) and 128 (88-160); with one, hidden 64 compiles clean on sm_80 and sm_90 (ptxas,
    tests/test_gpu_compile.py; from 128 up they spill: NO_FIT there)."""
    return sequence_blocks(hidden, torch.float32)


def _options(lengths, resets, zoneout, zoneout_seed, like: Tensor) -> dict:
    mode = 0 if zoneout == 0 else (2 if zoneout_seed is not None else 1)
    return dict(
        args=(None if lengths is None else lengths.to(like.device).contiguous(),
              None if resets is None else resets.to(like.device).contiguous(),
              None if zoneout_seed is None else zoneout_seed.to(like.device)),
        flags=dict(HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None, ZONEOUT=mode),
        keep_below=int(zoneout * 2**32))


def check_options(seq_len, batch, lengths, resets, zoneout, zoneout_seed, reverse) -> None:
    """The data-dependent checks the fake implementations cannot make (bad input: a clear error, no launch)."""
    if lengths is not None and batch and bool(((lengths < 0) | (lengths > seq_len)).any()):
        raise ValueError(f"lengths: expected values in [0, {seq_len}], got {lengths.tolist()}")
    if resets is not None and reverse:
        raise ValueError("resets: not supported with reverse=True")
    if not 0 <= zoneout <= 1:
        raise ValueError(f"zoneout: expected a value in [0, 1], got {zoneout}")


def sequence_forward(is_lstm: bool, input, states0, w_ih, w_hh, bias_x, bias_h, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
                     cell_w, cell_b, eps, lengths, resets, zoneout, zoneout_seed, reverse, save_workspace):
    """-> output (T,B,H), final states (B,H) each, workspace (T,B,W) ACC (empty unless save_workspace)."""
    seq_len, batch, input_size = input.shape
    hidden = w_hh.shape[1]
    gates = 4 if is_lstm else 3
    check_options(seq_len, batch, lengths, resets, zoneout, zoneout_seed, reverse)
    acc = _acc(input.dtype)
    width = (14 * hidden + 3) if is_lstm else (10 * hidden + 2)
    output = input.new_empty(seq_len, batch, hidden)
    workspace = input.new_zeros(seq_len, batch, width, dtype=acc) if save_workspace else input.new_empty(0, dtype=acc)
    states = [s.to(acc).contiguous().clone() for s in states0]
    if seq_len == 0 or batch == 0:
        return output, [s.to(input.dtype) for s in states], workspace
    gx = input.reshape(-1, input_size).to(acc) @ w_ih.to(acc).t()
    mean = gx.mean(-1, keepdim=True)
    rstd = torch.rsqrt(gx.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (gx - mean) * rstd
    gx = xhat * ln_ih_w.to(acc) + ln_ih_b.to(acc)
    if bias_x is not None:
        gx = gx + bias_x.to(acc)
    if save_workspace:
        flat = workspace.view(seq_len * batch, width)
        flat[:, 4 * hidden: 4 * hidden + gates * hidden] = xhat
        flat[:, (14 if is_lstm else 10) * hidden] = rstd[:, 0]
    options = _options(lengths, resets, zoneout, zoneout_seed, input)
    h0 = states[0].clone()
    c0 = states[1].clone() if is_lstm else h0
    c_state = states[1] if is_lstm else h0.clone()
    vec = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    tensors = (gx.contiguous(), w_hh.to(acc).contiguous(), vec(ln_hh_w), vec(ln_hh_b), vec(bias_h), vec(cell_w),
               vec(cell_b), *options["args"], h0, c0, states[0], c_state, output,
               workspace if save_workspace else None)
    scalars = (seq_len, batch, hidden, eps, zoneout, options["keep_below"])
    flags = dict(IS_LSTM=is_lstm, HAS_BIAS_H=bias_h is not None, REVERSE=bool(reverse),
                 SAVE_WORKSPACE=bool(save_workspace), **options["flags"],
                 **{**kernel_dtypes(input), "DOT": kernel_dtypes(states[0])["DOT"]})
    # Imported here: kernels/_layernorm_split.py builds on this module's device helpers.
    from ._layernorm_split import layernorm_mode, split_forward
    mode = layernorm_mode(batch, hidden, sm_count(input.device))
    if mode["mode"] == "rows":
        launch(_layernorm_sequence_forward_kernel, sequence_grid(batch), input.device)(
            *tensors, *scalars, **flags, **sequence_tiles(hidden))
    else:
        split_forward(tensors, scalars, flags, mode, gates, states[0])
    return output, [s.to(input.dtype) for s in states], workspace


def sequence_backward(is_lstm: bool, grad_output, grad_finals, input, states0, w_ih, w_hh, ln_ih_w, ln_hh_w, cell_w,
                      cell_b, output, workspace, lengths, resets, zoneout, zoneout_seed, reverse):
    """-> grad_input, [grad of each initial state], grad_w_ih, grad_w_hh, d_post_x, d_post_h (T*B, G*H), extra
    (T*B, H), all ACC but grad_input and the states' (the caller sums the parameter gradients)."""
    seq_len, batch, input_size = input.shape
    hidden = w_hh.shape[1]
    gates = 4 if is_lstm else 3
    check_options(seq_len, batch, lengths, resets, zoneout, zoneout_seed, reverse)
    acc = _acc(input.dtype)
    rows = seq_len * batch
    new = lambda *shape: input.new_zeros(*shape, dtype=acc)  # noqa: E731
    d_post_x, d_post_h, d_gx, d_gh = (new(rows, gates * hidden) for _ in range(4))
    extra, h_prev = new(rows, hidden), new(rows, hidden)
    d_states = [g.to(acc).contiguous().clone() for g in grad_finals]
    if rows:
        options = _options(lengths, resets, zoneout, zoneout_seed, input)
        initial = [s.to(acc).contiguous() for s in states0]
        d_c = d_states[1] if is_lstm else d_states[0].clone()
        vec = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
        tensors = (grad_output.contiguous(), output.contiguous(), workspace.contiguous(), w_hh.to(acc).contiguous(),
                   vec(ln_ih_w), vec(ln_hh_w), vec(cell_w), vec(cell_b), *options["args"], initial[0],
                   initial[1] if is_lstm else initial[0], d_states[0], d_c, d_post_x, d_post_h, d_gx, d_gh, extra,
                   h_prev)
        scalars = (seq_len, batch, hidden, zoneout, options["keep_below"])
        flags = dict(IS_LSTM=is_lstm, REVERSE=bool(reverse), **options["flags"],
                     **{**kernel_dtypes(input), "DOT": kernel_dtypes(d_gx)["DOT"]})
        # The forward's rule (the same arguments: a layer's forward and backward share the mode).
        from ._layernorm_split import layernorm_mode, split_backward
        mode = layernorm_mode(batch, hidden, sm_count(input.device))
        if mode["mode"] == "rows":
            launch(_layernorm_sequence_backward_kernel, sequence_grid(batch), input.device)(
                *tensors, *scalars, **flags, **sequence_tiles(hidden))
        else:
            d_init = split_backward(tensors, scalars, flags, mode, gates, d_gx)
            d_states[0] += d_init[0]
            if is_lstm:
                d_states[1] += d_init[1]
    grad_input = (d_gx @ w_ih.to(acc)).view(seq_len, batch, input_size).to(input.dtype)
    grad_w_ih = d_gx.t() @ input.reshape(rows, input_size).to(acc)
    grad_w_hh = d_gh.t() @ h_prev
    return grad_input, [d.to(input.dtype) for d in d_states], grad_w_ih, grad_w_hh, d_post_x, d_post_h, extra


def weighted_column_sum(grads: Tensor, workspace: Tensor, offset: int) -> Tensor:
    """sum over rows of grads (T*B, n) * the workspace's columns [offset, offset + n)."""
    flat = workspace.reshape(-1, workspace.shape[-1])
    return (grads * flat[:, offset:offset + grads.shape[1]]).sum(0)


# ==================================================================================================
# The LayerNorm LSTM's op signatures (seqkern/ops/_schemas.py).
# ==================================================================================================
def layernorm_lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                           ln_cell_weight, ln_cell_bias, eps, lengths, resets, zoneout, zoneout_seed, reverse,
                           save_workspace):
    bias_x = None if b_ih is None else b_ih + b_hh
    output, (h_n, c_n), workspace = sequence_forward(
        True, input, (h0, c0), w_ih, w_hh, bias_x, None, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
        ln_cell_weight, ln_cell_bias, eps, lengths, resets, zoneout, zoneout_seed, reverse, save_workspace)
    return output, h_n, c_n, workspace


def layernorm_lstm_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, ln_ih_weight, ln_hh_weight,
                            ln_cell_weight, ln_cell_bias, output, workspace, lengths, resets, zoneout, zoneout_seed,
                            reverse):
    hidden = w_hh.shape[1]
    grad_input, (grad_h0, grad_c0), grad_w_ih, grad_w_hh, d_post, _, extra = sequence_backward(
        True, grad_output, (grad_h_n, grad_c_n), input, (h0, c0), w_ih, w_hh, ln_ih_weight, ln_hh_weight,
        ln_cell_weight, ln_cell_bias, output, workspace, lengths, resets, zoneout, zoneout_seed, reverse)
    dtype = input.dtype
    return (grad_input, grad_h0, grad_c0, grad_w_ih.to(dtype), grad_w_hh.to(dtype), column_sums(d_post).to(dtype),
            weighted_column_sum(d_post, workspace, 4 * hidden).to(dtype),
            weighted_column_sum(d_post, workspace, 8 * hidden).to(dtype),
            weighted_column_sum(extra, workspace, 12 * hidden).to(dtype), column_sums(extra).to(dtype))
