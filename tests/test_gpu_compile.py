"""Static GPU checks with no GPU: every Triton kernel (attention, decode, additive, the recurrent row-block forwards
and backwards where the rule keeps them, the split recurrent forward and backward, the LayerNorm LSTM / GRU
kernels), for every configuration its launcher can choose on CUDA, compiled ahead of time for sm_80 (A100) and
sm_90 (H100) with triton.compile + GPUTarget, asserting that ptxas spilled no registers and that the kernel's shared
memory fits the target's per-block limit.

The configurations are the launchers' own selection functions called for CUDA (`configs(...)`): a tile that
cannot fit must be kept out by that rule, and these tests prove it does, by compiling exactly what it returns.
Each kernel is compiled with all its optional features on (attention mask, dropout, variable lengths, ...): the
variant with the most live registers, which bounds the lighter ones; flash attention's launchers have larger
tiles for launches without mask and dropout, compiled as "[light]" kernels.

Cost: a compile takes ~5-10 s of one core (ptxas included), 20-40 s on this loaded 2-core machine (the recurrent
split kernels: 1-6 s). The default run compiles a representative subset (DEFAULT_CASES: 9 kernels, plus 4
compiles for the tf32 check; 13-20 s with triton's cache warm); `pytest -m gpu_compile` compiles the full matrix
(kernels x configs x dtypes x head dims x targets, float32 under allow_tf32 off and on). Triton caches compiled
kernels on disk (~/.triton/cache), so a second run costs seconds but for ptxas's reports (it runs again for each case:
a few minutes). Cases listed in NO_FIT (no config fits; empty now) are xfail(strict=True).

To add a kernel, append a Kernel to KERNELS: its JIT function, the arguments
of its heaviest launch for a dtype and head dim, the launcher's config list for them, and the dtypes and head
dims its launcher accepts.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqkern.kernels import _launch
from seqkern.kernels import additive_attention as additive
from seqkern.kernels import flash_attention as flash
from seqkern.kernels import flash_attention_decode as decode
from seqkern.kernels import _recurrent_split as split
from seqkern.kernels import gru, lstm, rnn
from seqkern.kernels import layernorm_lstm as layernorm
from seqkern.kernels import _layernorm_split as layernorm_split
from seqkern.kernels._recurrent import backward_mode, recurrent_mode
from seqkern.kernels._recurrent import sequence_blocks as recurrent_blocks
from seqkern.testing import allow_tf32

CUDA = torch.device("cuda")  # a device object, no GPU needed: the launchers' CUDA choices
# Per-block shared memory (opt-in maximum): A100 163 KB, H100 227 KB.
TARGETS = {"sm_80": (GPUTarget("cuda", 80, 32), 163 * 1024), "sm_90": (GPUTarget("cuda", 90, 32), 227 * 1024)}
# The matrix takes, of the head dims 32/64/128/256, the largest of each config list's range (the launchers
# give one list for padded head dims up to 64, one for 128, one for 256): at 32 the same tiles hold half the
# head-dim columns. Of the dtypes it takes one per operand unit: bfloat16 for the 16-bit tensor-core path
# (float16 compiles to the same code but for the conversion instructions; the default run compiles float16
# for some kernels), float32 (tf32 tensor-core products), float64 (FMA).
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel to compile. arguments(dtype, head_dim) -> every argument of its heaviest launch but the
    config's, by name (tensors stand for pointers of their dtype); configs(dtype, head_dim) -> the launcher's
    config list on CUDA (dicts of constexprs plus num_warps and num_stages)."""
    name: str
    function: triton.JITFunction
    arguments: Callable[[torch.dtype, int], dict]
    configs: Callable[[torch.dtype, int], list[dict]]
    dtypes: tuple = DTYPES
    head_dims: tuple = HEAD_DIMS


def _on_cuda(arguments: dict, dtype: torch.dtype, float32: str = "tf32x3") -> dict:
    """The launchers build DOT / PRECISION from the tensors' device; the CPU stand-ins here would get the
    interpreter's choices, so set the CUDA ones (`float32`: the kernel's precision for float32 without tf32,
    as its launcher passes it to dot_precision)."""
    if "DOT" in arguments:
        arguments["DOT"] = _launch.dot_operand_dtype(dtype, CUDA)
    if "PRECISION" in arguments:
        arguments["PRECISION"] = _launch.dot_precision(dtype, CUDA, float32)
    return arguments


# ------------------------------------------------------------------------------------------------------------
# flash_attention: forward, dQ (with delta and grad_scores), dK/dV; mask, dropout and varlen on.
# ------------------------------------------------------------------------------------------------------------
def _flash_common(dtype: torch.dtype, head_dim: int, light: bool) -> dict:
    """The heaviest launch (mask, dropout, varlen, a window), or with `light` the plainest (none of them:
    the launcher's larger light lists)."""
    q = torch.zeros(1, 4, 32, head_dim, dtype=dtype)
    k = torch.zeros(1, 2, 32, head_dim, dtype=dtype)
    mask = None if light else torch.zeros(1, 4, 32, 32, dtype=dtype)
    cu_seqlens = None if light else torch.tensor([0, 32], dtype=torch.int32)
    seed = torch.zeros((), dtype=torch.int64)
    arguments = flash._arguments(q, k, k, mask, cu_seqlens, cu_seqlens, 0.125, 8, 0, True, 0 if light else 0.1, seed)
    return _on_cuda(arguments, dtype, flash.FLOAT32_PRECISION)


def _flash_forward(dtype, head_dim, light=False):
    return dict(_flash_common(dtype, head_dim, light), out_ptr=torch.zeros(1, dtype=dtype),
                lse_ptr=torch.zeros(1, dtype=torch.float64))


def _flash_backward(dtype, head_dim, light):
    grad = torch.zeros(1, 4, 32, head_dim, dtype=dtype)
    return dict(_flash_common(dtype, head_dim, light), grad_out_ptr=grad, stride_gb=grad.stride(0),
                stride_gh=grad.stride(1), stride_gl=grad.stride(2), lse_ptr=torch.zeros(1, dtype=torch.float64),
                delta_ptr=torch.zeros(1, dtype=torch.float64))


def _flash_query_gradients(dtype, head_dim, light=False):
    return dict(_flash_backward(dtype, head_dim, light), grad_q_ptr=torch.zeros(1, dtype=dtype),
                grad_scores_ptr=None if light else torch.zeros(1, dtype=dtype), GRAD_SCORES=not light)


def _flash_key_gradients(dtype, head_dim, light=False):
    return dict(_flash_backward(dtype, head_dim, light), grad_k_ptr=torch.zeros(1, dtype=dtype),
                grad_v_ptr=torch.zeros(1, dtype=dtype))


def _flash_configs(kernel: str, light: bool = False):
    return lambda dtype, head_dim: flash.configs(kernel, dtype, CUDA, head_dim, head_dim, light)


def _light(arguments: Callable) -> Callable:
    return lambda dtype, head_dim: arguments(dtype, head_dim, light=True)


# ------------------------------------------------------------------------------------------------------------
# flash_attention_decode (split kernel with lengths, causal and a window; merge kernel) and additive attention
# (forward with mask and weights; the four backward kernels): arguments filled by name.
# ------------------------------------------------------------------------------------------------------------
def _filled(function: triton.JITFunction, dtype: torch.dtype, given: dict, float32: str = "tf32x3") -> dict:
    """`given`, and for every other parameter of `function`: a pointer of `dtype` (names ending in _ptr), a
    float (names holding "scale"), or an int that no 16 divides (as a worst case for vectorization); `float32`
    as for _on_cuda."""
    arguments = dict(given)
    for param in function.params:
        if param.name in arguments or param.is_constexpr:
            continue
        if param.name.endswith("_ptr"):
            arguments[param.name] = torch.zeros(1, dtype=dtype)
        elif "scale" in param.name:
            arguments[param.name] = 0.125
        else:
            arguments[param.name] = 1000
    return _on_cuda(arguments, dtype, float32)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# R = (query heads per kv head) x queries: a program takes at most decode.MAX_BLOCK_R of them (more are a grid axis),
# so 1024 rows (64 query heads on one kv head, 16 queries) compile the tiles every R launches.
DECODE_ROWS = 1024


def _decode_split(dtype, head_dim, rows=DECODE_ROWS):
    acc = _accumulator(dtype)
    return _filled(decode._decode_split_kernel, dtype, dict(
        decode._split_blocks(rows, head_dim, head_dim), seqlens_ptr=torch.zeros(1, dtype=torch.int32),
        part_out_ptr=torch.zeros(1, dtype=acc), part_lse_ptr=torch.zeros(1, dtype=acc), HAS_SEQLENS=True,
        IS_CAUSAL=True, HAS_WINDOW=True, ACC=_launch_acc(dtype), DOT=None, PRECISION=None), decode.FLOAT32_PRECISION)


def _decode_merge(dtype, head_dim):
    acc = _accumulator(dtype)
    return _filled(decode._decode_merge_kernel, dtype, dict(
        part_out_ptr=torch.zeros(1, dtype=acc), part_lse_ptr=torch.zeros(1, dtype=acc),
        lse_ptr=torch.zeros(1, dtype=acc), ACC=_launch_acc(dtype), BLOCK_S=16, BLOCK_DV=head_dim))


def _launch_acc(dtype: torch.dtype):
    return flash.accumulator_dtype(dtype)


ADDITIVE_HIDDEN = 256  # the hidden size only sets the loop count: BLOCK_H is at most 4 on a GPU
ADDITIVE_LENGTH = 1024


def _additive_common(dtype, kernel: triton.JITFunction, **given) -> dict:
    acc = _accumulator(dtype)
    for name in ("weights_ptr", "grad_weights_ptr", "grad_scores_ptr", "grad_v_parts_ptr", "lse_ptr"):
        if name in kernel.arg_names:
            given.setdefault(name, torch.zeros(1, dtype=acc))
    flags = dict(FAST_TANH=additive._fast_tanh(dtype, CUDA), ACC=_launch_acc(dtype), DOT=None, PRECISION=None)
    given.update({name: value for name, value in flags.items() if name in kernel.arg_names})
    return _filled(kernel, dtype, given)


def _additive_forward(dtype, value_dim):
    return _additive_common(dtype, additive._forward_kernel, mask_ptr=torch.zeros(1, dtype=torch.bool),
                            HAS_MASK=True, WEIGHTS=True, BLOCK_DV=additive._padded(value_dim))


def _additive_forward_configs(dtype, value_dim):
    return additive.forward_configs(dtype, CUDA, ADDITIVE_LENGTH, ADDITIVE_LENGTH, ADDITIVE_HIDDEN, value_dim)


def _additive_backward(kernel: triton.JITFunction, **given):
    return lambda dtype, value_dim: _additive_common(dtype, kernel, **given)


def _additive_backward_configs(kernel: triton.JITFunction):
    """The backward's one config, cut to the constexprs `kernel` takes."""
    def configs(dtype, value_dim):
        tiles = additive.blocks("backward", dtype, CUDA, ADDITIVE_LENGTH, ADDITIVE_LENGTH, ADDITIVE_HIDDEN,
                                value_dim)
        return [{name: value for name, value in tiles.items() if name in kernel.arg_names or name in _OPTIONS}]
    return configs


# ------------------------------------------------------------------------------------------------------------
# Recurrent forward, hidden units split across programs (kernels/_recurrent_split.py): every config the launcher's
# rule (kernels/_recurrent.py recurrent_mode) picks for A100 / H100 SM counts and batches 1 .. 4096, with every
# flag on (batch sizes, lengths, resets, reverse, workspace, the LSTM's / GRU's zoneout with a mask), and the split
# backward in the same modes. "head_dim" is the hidden size here.
# ------------------------------------------------------------------------------------------------------------
RECURRENT_HIDDEN = (128, 256, 512, 1024)
RECURRENT_DTYPES = (torch.bfloat16, torch.float32)
SM_COUNTS = (108, 132)  # A100, H100 SXM
BATCHES = (1, 8, 16, 32, 64, 128, 256, 1024, 4096)


def _split_arguments(cell: int, proj: bool = False) -> Callable:
    """The split forward with every flag on; with `proj` the LSTM's projection at P = H (the widest h)."""
    def arguments(dtype, hidden):
        state = split.GATES[cell] > 1  # the LSTM's c, the GRU's h
        given = dict(
            w_hr_ptr=torch.zeros(1, dtype=dtype) if proj else None,
            proj_in_ptr=torch.zeros(1, dtype=dtype) if proj else None, P=hidden, HAS_PROJ=proj,
            b_hh_ptr=torch.zeros(1, dtype=dtype) if cell == split.GRU else None,
            batch_sizes_ptr=torch.zeros(1, dtype=torch.int64), lengths_ptr=torch.zeros(1, dtype=torch.int64),
            resets_ptr=torch.zeros(1, dtype=torch.uint8), seed_ptr=torch.zeros(1, dtype=torch.int64) if state else None,
            state0_ptr=torch.zeros(1, dtype=dtype) if state else None,
            state_ptr=torch.zeros(1, dtype=_accumulator(dtype)) if state else None,
            workspace_ptr=torch.zeros(1, dtype=dtype) if state else None,
            states_ptr=torch.zeros(1, dtype=dtype) if cell == split.LSTM else None,
            arrivals_ptr=torch.zeros(1, dtype=torch.int32), H=hidden, zoneout_hi=0.25, zoneout_lo=0.0,
            CELL=cell, GATES=split.GATES[cell], HAS_STATE=state, HAS_HH_BIAS=cell == split.GRU,
            SAVE_WORKSPACE=state, SAVE_STATES=cell == split.LSTM, HAS_BATCH_SIZES=True, USE_LENGTHS=True,
            USE_RESETS=True, ZONEOUT=state, ZONEOUT_MASK=state, REVERSE=True)
        tiles = split.split_tiles(_split_modes(cell, dtype, hidden)[0], hidden, dtype, CUDA)
        given.update({name: tiles[name] for name in ("ACC", "DOT", "PRECISION", "BLOCK_K", "BLOCK_HK")})
        return _filled(split._split_forward_kernel, dtype, given)
    return arguments


def _split_backward_arguments(cell: int, proj: bool = False) -> Callable:
    """The split backward with every flag on (batch sizes, lengths, resets, reverse; zoneout with a mask for the LSTM
    and the GRU); with `proj` the LSTM's projection at P = H."""
    def arguments(dtype, hidden):
        state = split.GATES[cell] > 1
        given = dict(
            w_hr_ptr=torch.zeros(1, dtype=dtype) if proj else None,
            grad_h_all_ptr=torch.zeros(1, dtype=dtype) if proj else None, P=hidden, HAS_PROJ=proj,
            workspace_ptr=torch.zeros(1, dtype=dtype) if state else None,
            states_ptr=torch.zeros(1, dtype=dtype) if cell == split.LSTM else None,
            state0_ptr=torch.zeros(1, dtype=dtype) if cell == split.LSTM else None,
            batch_sizes_ptr=torch.zeros(1, dtype=torch.int64), lengths_ptr=torch.zeros(1, dtype=torch.int64),
            resets_ptr=torch.zeros(1, dtype=torch.uint8), seed_ptr=torch.zeros(1, dtype=torch.int64) if state else None,
            carry_ptr=torch.zeros(1, dtype=_accumulator(dtype)), arrivals_ptr=torch.zeros(1, dtype=torch.int32),
            H=hidden, zoneout_hi=0.25, zoneout_lo=0.0, CELL=cell, GATES=split.GATES[cell],
            WIDTH=4 if state else 1, HAS_BATCH_SIZES=True, USE_LENGTHS=True, USE_RESETS=True, ZONEOUT=state,
            ZONEOUT_MASK=state, REVERSE=True)
        tiles = split.split_tiles(_split_modes(cell, dtype, hidden)[0], hidden, dtype, CUDA)
        given.update({name: tiles[name] for name in ("ACC", "DOT", "PRECISION", "BLOCK_K")})
        return _filled(split._split_backward_kernel, dtype, given)
    return arguments


def _split_backward_configs(cell: int) -> Callable:
    """The backward's configs: the forward's modes through backward_mode, less RESIDENT (the backward streams its
    W_hh columns), deduplicated."""
    def configs(dtype, hidden):
        distinct = []
        for mode in _split_modes(cell, dtype, hidden):
            config = _backward_config(mode)
            if config not in distinct:
                distinct.append(config)
        return distinct
    return configs


def _backward_config(mode: dict) -> dict:
    mode = backward_mode(mode)
    return {"PERSISTENT": mode["mode"] == "persistent", "BLOCK_B": mode["BLOCK_B"], "BLOCK_U": mode["BLOCK_U"],
            "num_warps": mode["num_warps"], "num_stages": mode["num_stages"], "maxnreg": mode["maxnreg"]}


def _split_modes(cell: int, dtype: torch.dtype, hidden: int) -> list[dict]:
    """The distinct split modes recurrent_mode picks for `hidden` over SM_COUNTS x BATCHES."""
    modes = []
    for sms in SM_COUNTS:
        for batch in BATCHES:
            mode = recurrent_mode(batch, hidden, split.GATES[cell], dtype, sms)
            if mode["mode"] != "rows" and mode not in modes:
                modes.append(mode)
    return modes


def _split_configs(cell: int) -> Callable:
    def configs(dtype, hidden):
        return [{"PERSISTENT": mode["mode"] == "persistent", "RESIDENT": mode["RESIDENT"], "BLOCK_B": mode["BLOCK_B"],
                 "BLOCK_U": mode["BLOCK_U"], "num_warps": mode["num_warps"], "num_stages": mode["num_stages"],
                 "maxnreg": mode["maxnreg"]}
                for mode in _split_modes(cell, dtype, hidden)]
    return configs


# The row-block kernels: the rule keeps them (forward and backward) at hidden <= ROWS_MAX_HIDDEN (128) only; the
# LayerNorm kernels at every hidden size.
ROWS_HIDDEN = (64, 128, 256, 512, 1024)
ROWS_RULE_HIDDEN = (64, 128)


def _rows_arguments(function: triton.JITFunction, **flags) -> Callable:
    """The row-block forward kernel with every flag on (batch sizes, lengths, resets, zoneout with a mask, reverse,
    workspace; the LSTM's projection at P = H)."""
    def arguments(dtype, hidden):
        given = dict(batch_sizes_ptr=torch.zeros(1, dtype=torch.int64), lengths_ptr=torch.zeros(1, dtype=torch.int64),
                     resets_ptr=torch.zeros(1, dtype=torch.uint8), seed_ptr=torch.zeros(1, dtype=torch.int64),
                     H=hidden, zoneout_hi=0.25, zoneout_lo=0.0, HAS_BATCH_SIZES=True, USE_LENGTHS=True,
                     USE_RESETS=True, ZONEOUT=True, ZONEOUT_MASK=True, REVERSE=True, SAVE_WORKSPACE=True,
                     ACC=_launch_acc(dtype), DOT=None, BLOCK_B=16, BLOCK_H=max(16, triton.next_power_of_2(hidden)),
                     BLOCK_K=16, **flags)
        if "P" in function.arg_names:
            given.update(P=hidden, BLOCK_P=given["BLOCK_H"])
        return _filled(function, dtype, {name: value for name, value in given.items() if name in function.arg_names})
    return arguments


def _rows_configs(dtype, hidden):
    """The row-block kernels' one config (kernels/_recurrent.py sequence_blocks)."""
    blocks = recurrent_blocks(hidden, dtype)
    return [{"num_warps": blocks["num_warps"], "num_stages": blocks["num_stages"]}]


def _rows_kernel(name: str, function: triton.JITFunction, hidden: tuple = ROWS_HIDDEN, **flags) -> Kernel:
    return Kernel(f"recurrent_rows.{name}", function, _rows_arguments(function, **flags), _rows_configs,
                  dtypes=RECURRENT_DTYPES, head_dims=hidden)


def _layernorm_arguments(function: triton.JITFunction) -> Callable:
    """A LayerNorm LSTM kernel (kernels/layernorm_lstm.py; the GRU's is the same kernel with IS_LSTM off, fewer
    tiles) with every flag on (the recurrent bias, lengths, resets, zoneout with a mask, reverse, workspace). It
    computes in ACC whatever the storage dtype (the launcher converts W_hh and the states to float32)."""
    def arguments(dtype, hidden):
        acc = _accumulator(dtype)
        given = dict(lengths_ptr=torch.zeros(1, dtype=torch.int64), resets_ptr=torch.zeros(1, dtype=torch.bool),
                     seed_ptr=torch.zeros(1, dtype=torch.int64), output_ptr=torch.zeros(1, dtype=dtype),
                     grad_output_ptr=torch.zeros(1, dtype=dtype), H=hidden, eps=1e-5, zoneout=0.25,
                     IS_LSTM=True, HAS_BIAS_H=True, HAS_LENGTHS=True, HAS_RESETS=True, ZONEOUT=2, REVERSE=True,
                     SAVE_WORKSPACE=True, ACC=_launch_acc(dtype), DOT=_launch.dot_operand_dtype(acc, CUDA),
                     **_layernorm_blocks(hidden))
        given = {name: value for name, value in given.items() if name in function.arg_names}
        return _filled(function, acc, given)
    return arguments


def _layernorm_blocks(hidden: int) -> dict:
    return {name: value for name, value in layernorm.sequence_tiles(hidden).items()
            if name in ("BLOCK_B", "BLOCK_H", "BLOCK_K")}


def _layernorm_configs(dtype, hidden):
    """The LayerNorm kernels' one config (kernels/layernorm_lstm.py sequence_tiles)."""
    blocks = layernorm.sequence_tiles(hidden)
    return [{"num_warps": blocks["num_warps"], "num_stages": blocks["num_stages"]}]


def _layernorm_kernel(name: str, function: triton.JITFunction, hidden: tuple = ROWS_HIDDEN) -> Kernel:
    return Kernel(f"layernorm_recurrent.{name}", function, _layernorm_arguments(function), _layernorm_configs,
                  dtypes=RECURRENT_DTYPES, head_dims=hidden)


# The split LayerNorm forward (kernels/_layernorm_split.py): the rule picks it on CUDA above padded hidden 64 (the
# row-block forward is compiled at 64 only, where the rule keeps it), persistent or per step. Its phases are branches
# of one kernel (a runtime phase index), so a config is a launch mode; the GRU (IS_LSTM off) has fewer tiles.
LAYERNORM_SPLIT_HIDDEN = (128, 256, 512, 1024)


def _layernorm_split_arguments(function: triton.JITFunction, is_lstm: bool) -> Callable:
    """A split LayerNorm kernel (forward or backward) with every flag on (the recurrent bias, lengths, resets,
    zoneout with a mask, reverse, workspace); float32 math whatever the storage dtype (the launchers convert W_hh
    and the states)."""
    def arguments(dtype, hidden):
        acc = _accumulator(dtype)
        given = dict(lengths_ptr=torch.zeros(1, dtype=torch.int64), resets_ptr=torch.zeros(1, dtype=torch.bool),
                     seed_ptr=torch.zeros(1, dtype=torch.int64), output_ptr=torch.zeros(1, dtype=dtype),
                     grad_output_ptr=torch.zeros(1, dtype=dtype), arrivals_ptr=torch.zeros(1, dtype=torch.int32),
                     H=hidden, eps=1e-5, zoneout=0.25, IS_LSTM=is_lstm, HAS_BIAS_H=True, HAS_LENGTHS=True,
                     HAS_RESETS=True, ZONEOUT=2, REVERSE=True, SAVE_WORKSPACE=True, ACC=_launch_acc(dtype),
                     DOT=_launch.dot_operand_dtype(acc, CUDA))
        return _filled(function, acc, {name: value for name, value in given.items() if name in function.arg_names})
    return arguments


def _layernorm_split_config(mode: dict) -> dict:
    return {"PERSISTENT": mode["mode"] == "persistent", **{k: v for k, v in mode.items() if k != "mode"}}


def _layernorm_split_configs(dtype, hidden):
    """The distinct split configs layernorm_mode picks for `hidden` over SM_COUNTS x BATCHES."""
    configs = []
    for sms in SM_COUNTS:
        for batch in BATCHES:
            mode = layernorm_split.layernorm_mode(batch, hidden, sms)
            if mode["mode"] != "rows" and _layernorm_split_config(mode) not in configs:
                configs.append(_layernorm_split_config(mode))
    return configs


def _layernorm_split_kernel(name: str, is_lstm: bool, backward: bool = False) -> Kernel:
    function = (layernorm_split._layernorm_split_backward_kernel if backward
                else layernorm_split._layernorm_split_forward_kernel)
    return Kernel(f"layernorm_split.{name}.{'backward' if backward else 'forward'}", function,
                  _layernorm_split_arguments(function, is_lstm), _layernorm_split_configs, dtypes=RECURRENT_DTYPES,
                  head_dims=LAYERNORM_SPLIT_HIDDEN)


def _split_kernel(name: str, cell: int, proj: bool = False) -> Kernel:
    return Kernel(f"recurrent_split.{name}{'[proj]' if proj else ''}", split._split_forward_kernel,
                  _split_arguments(cell, proj), _split_configs(cell), dtypes=RECURRENT_DTYPES,
                  head_dims=RECURRENT_HIDDEN)


def _split_backward_kernel(name: str, cell: int, proj: bool = False) -> Kernel:
    return Kernel(f"recurrent_split.{name}.backward{'[proj]' if proj else ''}", split._split_backward_kernel,
                  _split_backward_arguments(cell, proj), _split_backward_configs(cell), dtypes=RECURRENT_DTYPES,
                  head_dims=RECURRENT_HIDDEN)


KERNELS = [
    _rows_kernel("lstm", lstm._lstm_sequence_forward_kernel, HAS_PROJ=True, hidden=ROWS_RULE_HIDDEN),
    _rows_kernel("gru", gru._gru_sequence_forward_kernel, HAS_BIAS=True, hidden=ROWS_RULE_HIDDEN),
    _rows_kernel("rnn", rnn._rnn_sequence_forward_kernel, RELU=False, hidden=ROWS_RULE_HIDDEN),
    _rows_kernel("lstm.backward", lstm._lstm_sequence_backward_kernel, HAS_PROJ=True, hidden=ROWS_RULE_HIDDEN),
    _rows_kernel("gru.backward", gru._gru_sequence_backward_kernel, HAS_BIAS=True, hidden=ROWS_RULE_HIDDEN),
    _rows_kernel("rnn.backward", rnn._rnn_sequence_backward_kernel, RELU=False, hidden=ROWS_RULE_HIDDEN),
    _layernorm_kernel("forward", layernorm._layernorm_sequence_forward_kernel, hidden=(64,)),
    _layernorm_split_kernel("lstm", True),
    _layernorm_split_kernel("gru", False),
    _layernorm_kernel("backward", layernorm._layernorm_sequence_backward_kernel, hidden=(64,)),
    _layernorm_split_kernel("lstm", True, backward=True),
    _layernorm_split_kernel("gru", False, backward=True),
    _split_kernel("lstm", split.LSTM),
    _split_kernel("gru", split.GRU),
    _split_kernel("rnn", split.RNN_TANH),
    _split_kernel("lstm", split.LSTM, proj=True),
    _split_backward_kernel("lstm", split.LSTM),
    _split_backward_kernel("lstm", split.LSTM, proj=True),
    _split_backward_kernel("gru", split.GRU),
    _split_backward_kernel("rnn", split.RNN_TANH),
    Kernel("flash_attention.forward", flash._forward_kernel, _flash_forward, _flash_configs("forward")),
    Kernel("flash_attention.query_gradients", flash._query_gradients_kernel, _flash_query_gradients,
           _flash_configs("query_gradients")),
    Kernel("flash_attention.key_gradients", flash._key_gradients_kernel, _flash_key_gradients,
           _flash_configs("key_gradients")),
    Kernel("flash_attention.forward[light]", flash._forward_kernel, _light(_flash_forward),
           _flash_configs("forward", light=True)),
    Kernel("flash_attention.query_gradients[light]", flash._query_gradients_kernel, _light(_flash_query_gradients),
           _flash_configs("query_gradients", light=True)),
    Kernel("flash_attention.key_gradients[light]", flash._key_gradients_kernel, _light(_flash_key_gradients),
           _flash_configs("key_gradients", light=True)),
    Kernel("flash_attention_decode.split", decode._decode_split_kernel, _decode_split,
           lambda dtype, head_dim: decode.configs(dtype, CUDA, head_dim, head_dim)),
    Kernel("flash_attention_decode.merge", decode._decode_merge_kernel, _decode_merge,
           lambda dtype, head_dim: [{"num_warps": 4, "num_stages": 3}]),  # triton's defaults: not tuned
    Kernel("additive_attention.forward", additive._forward_kernel, _additive_forward, _additive_forward_configs),
    Kernel("additive_attention.grad_scores", additive._grad_scores_kernel,
           _additive_backward(additive._grad_scores_kernel, HAS_GRAD_WEIGHTS=True),
           _additive_backward_configs(additive._grad_scores_kernel), head_dims=(64,)),  # Dv chunked: any Dv
    Kernel("additive_attention.query_proj_gradient", additive._query_proj_gradient_kernel,
           _additive_backward(additive._query_proj_gradient_kernel),
           _additive_backward_configs(additive._query_proj_gradient_kernel), head_dims=(64,)),  # Dv chunked: any Dv
    Kernel("additive_attention.key_proj_gradient", additive._key_proj_gradient_kernel,
           _additive_backward(additive._key_proj_gradient_kernel),
           _additive_backward_configs(additive._key_proj_gradient_kernel), head_dims=(64,)),  # Dv chunked: any Dv
    Kernel("additive_attention.values_gradient", additive._values_gradient_kernel,
           _additive_backward(additive._values_gradient_kernel),
           _additive_backward_configs(additive._values_gradient_kernel), head_dims=(64,)),  # Dv chunked: any Dv
]


# ------------------------------------------------------------------------------------------------------------
# Compiling and reading the result.
# ------------------------------------------------------------------------------------------------------------
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}


def _signature(function: triton.JITFunction, arguments: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch with `arguments`, as triton's launcher specializes it:
    tensors are pointers (16-byte aligned, as torch allocates), None and constexpr parameters are constants,
    ints are i32 (divisible by 16 where they are, unless do_not_specialize), floats fp32."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(function.params):
        name = param.name
        if name not in arguments:
            raise KeyError(f"{function.__name__}: no value for argument {name}")
        value = arguments[name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{function.__name__}: argument {name} of type {type(value).__name__}")
    return signature, constexprs, attrs


@dataclasses.dataclass(frozen=True)
class Compiled:
    registers: int
    spilled: int  # bytes of spill stores + spill loads per thread (ptxas -v)
    shared: int  # bytes of shared memory per block (triton's allocation)
    ptx: str


def _ptxas_report(ptx: str, target: str) -> dict:
    """Registers and spill bytes of the one function in `ptx`, from the bundled ptxas -v with triton's flags.

    ptxas runs again here (triton discards its log, and a kernel from triton's disk cache has none): its
    "spill stores / loads" are the spills. A stack frame alone is not one (calls to the slow paths of division
    and the like reserve stack), so cuobjdump's STACK would be the wrong test."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    capability = TARGETS[target][0].arch
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        done = subprocess.run([get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(capability)}", source, "-o",
                               os.path.join(folder, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    assert spills and registers, log
    return {"registers": int(registers.group(1)), "spilled": int(spills.group(1)) + int(spills.group(2))}


def compile_kernel(function: triton.JITFunction, arguments: dict, config: dict, target: str) -> Compiled:
    """`function` compiled for `target` ("sm_80" | "sm_90") with `arguments` and `config`, in a fresh process
    (see _compiler_process)."""
    where = (function.fn.__module__, function.fn.__name__)  # the child imports it: a JITFunction does not pickle
    return _compiler_process().submit(_compile_here, where, arguments, config, target).result()


@functools.cache
def _compiler_process() -> concurrent.futures.ProcessPoolExecutor:
    """One spawned process, kept for the session, that does the compiling: in the test session the Triton
    interpreter has run kernels (the other tests), and it patches triton.language process-wide while it runs, so
    a compile in this process can meet interpreter state (seen in the full suite: "'block_argument' object has no
    attribute 'get_element_ty'"). A spawned process has never interpreted anything."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


@pytest.fixture(scope="module", autouse=True)
def _close_compiler_process():
    yield
    if _compiler_process.cache_info().currsize:
        _compiler_process().shutdown()
        _compiler_process.cache_clear()


# Config entries that are compile options, not constexprs (maxnreg: ptxas's register cap, where a launcher sets one).
_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _compile_here(where: tuple[str, str], arguments: dict, config: dict, target: str) -> Compiled:
    function = getattr(importlib.import_module(where[0]), where[1])
    config = dict(config)
    options = {name: config.pop(name) for name in _OPTIONS if name in config}
    signature, constexprs, attrs = _signature(function, {**arguments, **config})
    compiled = triton.compile(ASTSource(function, signature, constexprs, attrs), target=TARGETS[target][0],
                              options=options)
    report = _ptxas_report(compiled.asm["ptx"], target)
    return Compiled(registers=report["registers"], spilled=report["spilled"], shared=compiled.metadata.shared,
                    ptx=compiled.asm["ptx"])


# ------------------------------------------------------------------------------------------------------------
# The matrix: every kernel x its launcher's configs x dtypes x head dims x targets (-m gpu_compile), or each
# kernel once in its first (largest) config (the default run).
# ------------------------------------------------------------------------------------------------------------
# The default run: one kernel of each op, spread over dtypes, head dims (hidden sizes), targets, the two flash
# variants and the two float32 paths (the last field: torch.backends.cuda.matmul.allow_tf32).
DEFAULT_CASES = (("flash_attention.forward", torch.bfloat16, 128, "sm_90", False),
                 ("flash_attention.key_gradients[light]", torch.float16, 64, "sm_80", False),
                 ("flash_attention.query_gradients", torch.float32, 128, "sm_90", False),  # ieee: float32 FMAs
                 ("flash_attention.key_gradients", torch.float64, 256, "sm_80", False),  # one head-dim CHUNK
                 ("flash_attention_decode.split", torch.bfloat16, 128, "sm_90", False),
                 ("additive_attention.forward", torch.float16, 64, "sm_80", False),
                 ("recurrent_split.lstm", torch.bfloat16, 1024, "sm_90", False),  # persistent, 16 units, streamed
                 ("recurrent_split.gru", torch.float32, 256, "sm_80", False),  # persistent, 32 units, tf32x3
                 ("recurrent_split.lstm.backward[proj]", torch.float32, 512, "sm_80", False),  # two phases per step
                 ("layernorm_split.lstm.forward", torch.bfloat16, 1024, "sm_90", False),  # persistent, 3 phases
                 ("layernorm_split.lstm.backward", torch.float32, 512, "sm_80", False))  # persistent, 4 phases


# Kernels, dtypes and head dims (hidden sizes) for which no config fits: ptxas spills at the smallest tile and with
# the register cap at 255, so the launcher would keep the least spilling config. (kernel, dtype, allow_tf32, head dim)
# -> {target: the ptxas figures}; such cases are xfail(strict=True): they assert that the spill is still there.
# Empty since the LayerNorm kernels were split (kernels/_layernorm_split.py; the row-block LayerNorm kernels spilled
# from hidden 128: forward 32-124 bytes, backward 528-576 at one stage; 1.8-7.3 KB at 256 with 3 stages, and the
# rule now keeps them at 64). Before: flash attention's backward (fitted by streaming its operands over the head
# dim, kernels/flash_attention.py CHUNK) and the row-block recurrent kernels past hidden 128 (fitted by the split
# kernels, kernels/_recurrent_split.py). NOTES.md "GPU compile matrix" has the history.
NO_FIT: dict = {}


def _tf32_settings(kernel: Kernel, dtype: torch.dtype) -> tuple:
    """allow_tf32 values that change what `kernel` compiles for `dtype`: both for float32 operands of tl.dot (the
    tf32 path and the kernel's full-accuracy one have their own tiles), else the default only."""
    return (False, True) if dtype == torch.float32 and "PRECISION" in kernel.function.arg_names else (False,)


def _cases(full: bool) -> list:
    """Every (kernel, dtype, head dim, config, target, allow_tf32) with `full`, else DEFAULT_CASES in their
    kernel's first (largest) config."""
    cases = []
    by_name = {kernel.name: kernel for kernel in KERNELS}
    if not full:
        for name, dtype, head_dim, target, tf32 in DEFAULT_CASES:
            kernel = by_name[name]
            with allow_tf32(tf32):
                config = kernel.configs(dtype, head_dim)[0]
            cases.append(pytest.param(kernel, dtype, head_dim, config, target, tf32,
                                      id=_case_id(kernel, dtype, head_dim, config, target, tf32)))
        return cases
    for kernel in KERNELS:
        for dtype in kernel.dtypes:
            for tf32 in _tf32_settings(kernel, dtype):
                for head_dim in kernel.head_dims:
                    with allow_tf32(tf32):
                        configs = kernel.configs(dtype, head_dim)
                    for config in configs:
                        for target in sorted(TARGETS):
                            cases.append(pytest.param(kernel, dtype, head_dim, config, target, tf32,
                                                      id=_case_id(kernel, dtype, head_dim, config, target, tf32),
                                                      marks=_no_fit_mark(kernel, dtype, tf32, head_dim, target)))
    return cases


def _no_fit_mark(kernel: Kernel, dtype: torch.dtype, tf32: bool, head_dim: int, target: str) -> tuple:
    """xfail(strict) for a NO_FIT case: it must still spill (the day it compiles clean, the entry must go)."""
    reason = NO_FIT.get((kernel.name, dtype, tf32, head_dim), {}).get(target)
    return (pytest.mark.xfail(reason=f"no config fits: {reason}", strict=True),) if reason else ()


def _case_id(kernel, dtype, head_dim, config, target, tf32) -> str:
    tiles = "-".join(f"{name}{value}" for name, value in config.items())
    return f"{kernel.name}-{str(dtype).removeprefix('torch.')}{'-tf32' if tf32 else ''}-d{head_dim}-{tiles}-{target}"


def pytest_generate_tests(metafunc):
    if "kernel" in metafunc.fixturenames:
        full = "gpu_compile" in (metafunc.config.option.markexpr or "")
        metafunc.parametrize("kernel, dtype, head_dim, config, target, tf32", _cases(full))


@pytest.mark.gpu_compile
def test_kernel_compiles_without_spills_within_shared_memory(kernel, dtype, head_dim, config, target, tf32):
    with allow_tf32(tf32):
        arguments = kernel.arguments(dtype, head_dim)
    compiled = compile_kernel(kernel.function, arguments, config, target)
    assert compiled.spilled == 0, (
        f"register spills: {compiled.registers} registers, {compiled.spilled} bytes spilled per thread")
    limit = TARGETS[target][1]
    assert compiled.shared <= limit, f"{compiled.shared} bytes of shared memory > the {target} limit {limit}"


def _products(function: triton.JITFunction, arguments: dict, config: dict) -> list[str]:
    """The tensor-core instructions (mma.sync) of `function` compiled for sm_80."""
    return re.findall(r"mma\.sync\.aligned\.\S+", compile_kernel(function, arguments, config, "sm_80").ptx)


@pytest.mark.gpu_compile
def test_float32_products_follow_torch_allow_tf32():
    """float32 products: tf32 where torch.backends.cuda.matmul.allow_tf32 allows, else each kernel's
    full-accuracy path: float32 FMAs ("ieee") in flash attention and decoding, tf32x3 (each product done as three
    tf32 ones, ~float32's accuracy) in the additive kernel. The launcher's choice reaches the compiled kernel."""
    counts = {}
    for allow in (True, False):
        with allow_tf32(allow):
            flash_arguments = _flash_forward(torch.float32, 64)
            flash_config = flash.configs("forward", torch.float32, CUDA, 64, 64)[-1]
            decode_arguments = _decode_split(torch.float32, 64)
            additive_arguments = _additive_forward(torch.float32, 64)
            additive_config = _additive_forward_configs(torch.float32, 64)[-1]
        assert flash_arguments["PRECISION"] == decode_arguments["PRECISION"] == ("tf32" if allow else "ieee")
        assert additive_arguments["PRECISION"] == ("tf32" if allow else "tf32x3")
        flash_products = _products(flash._forward_kernel, flash_arguments, flash_config)
        if allow:
            assert flash_products and all(".tf32.tf32" in product for product in flash_products), flash_products[:3]
        else:
            assert not flash_products, flash_products[:3]
        additive_products = _products(additive._forward_kernel, additive_arguments, additive_config)
        assert additive_products and all(".tf32.tf32" in p for p in additive_products), additive_products[:3]
        counts[allow] = len(additive_products)
    # three tf32 products per pair at least (measured: 96 against 16 in this kernel; flash attention's forward,
    # when it ran tf32x3, had exactly 3x)
    assert counts[False] >= 3 * counts[True]


# The recurrent layers as the launchers pass them to the rule: (kernel name, gates). The LSTM with a projection of
# size P passes max(H, P) as the hidden size: covered by the same hidden sizes.
RULE_OPS = (("lstm", 4), ("gru", 3), ("rnn", 1))


def _rule_modes(gates: int):
    """(dtype, hidden, mode) over hidden sizes 1-1024 (odd ones too), batches 1-4096, A100 / H100 SM counts."""
    for dtype in RECURRENT_DTYPES:
        for hidden in (1, 17, 64, 65, 100, 128, 129, 200, 256, 333, 512, 700, 1000, 1024):
            for batch in (1, 2, 3, 8, 16, 17, 32, 64, 100, 128, 256, 512, 1000, 1024, 2048, 4096):
                for sms in SM_COUNTS:
                    yield dtype, hidden, recurrent_mode(batch, hidden, gates, dtype, sms)


def _matrix_hidden(hidden: int) -> int:
    """The matrix's hidden size that compiles a layer of `hidden` units: the kernels' tiles are padded to a power of
    two (at least 64, the smallest the matrix compiles; smaller tiles hold less)."""
    return max(64, triton.next_power_of_2(hidden))


def test_recurrent_rule_never_picks_a_kernel_that_does_not_fit():
    """Issue 17: a configuration that cannot fit is excluded by the launcher's selection rule. Over hidden sizes,
    batches and SM counts, the rule (kernels/_recurrent.py recurrent_mode, which the forward and the backward
    launchers both follow) picks the row-block kernels (forward and backward) only where the matrix compiles them
    and they fit (not in NO_FIT), and split configs the matrix compiles at the padded hidden size (tiles, warps,
    launch mode, resident slice)."""
    by_name = {kernel.name: kernel for kernel in KERNELS}
    compiled = {}
    for name, gates in RULE_OPS:
        for dtype, hidden, mode in _rule_modes(gates):
            size = _matrix_hidden(hidden)
            if mode["mode"] == "rows":
                for kernel in (f"recurrent_rows.{name}", f"recurrent_rows.{name}.backward"):
                    assert size in by_name[kernel].head_dims and (kernel, dtype, False, size) not in NO_FIT, (
                        kernel, dtype, hidden)
                continue
            if (name, dtype, size) not in compiled:
                compiled[name, dtype, size] = (_split_configs(_CELLS[name])(dtype, size),
                                               _split_backward_configs(_CELLS[name])(dtype, size))
            config = {"PERSISTENT": mode["mode"] == "persistent", "RESIDENT": mode["RESIDENT"],
                      "BLOCK_B": mode["BLOCK_B"], "BLOCK_U": mode["BLOCK_U"], "num_warps": mode["num_warps"],
                      "num_stages": mode["num_stages"], "maxnreg": mode["maxnreg"]}
            assert config in compiled[name, dtype, size][0], (name, dtype, hidden, mode)
            assert _backward_config(mode) in compiled[name, dtype, size][1], (name, dtype, hidden, mode)


_CELLS = {"lstm": split.LSTM, "gru": split.GRU, "rnn": split.RNN_TANH}


def test_layernorm_rule_never_picks_a_kernel_that_does_not_fit():
    """The LayerNorm LSTM / GRU rule (kernels/_layernorm_split.py layernorm_mode, which the forward and backward
    launchers both follow): over hidden sizes 1-1024, batches 1-4096 and the SM counts it picks the row-block
    kernels only where the matrix compiles them and they fit (not in NO_FIT), and otherwise a split config that
    the matrix compiles at the padded hidden size, forward and backward."""
    by_name = {kernel.name: kernel for kernel in KERNELS}
    for dtype in RECURRENT_DTYPES:
        for hidden in (1, 17, 64, 65, 100, 128, 129, 200, 256, 333, 512, 700, 1000, 1024):
            size = _matrix_hidden(hidden)
            for batch in (1, 2, 16, 17, 64, 65, 100, 256, 1000, 4096):
                for sms in SM_COUNTS:
                    mode = layernorm_split.layernorm_mode(batch, hidden, sms)
                    rows = mode["mode"] == "rows"
                    names = ([f"layernorm_recurrent.{kind}" for kind in ("forward", "backward")] if rows else
                             [f"layernorm_split.{cell}.{kind}" for cell in ("lstm", "gru")
                              for kind in ("forward", "backward")])
                    for name in names:
                        kernel = by_name[name]
                        assert size in kernel.head_dims and (name, dtype, False, size) not in NO_FIT, (name, hidden)
                        if not rows:
                            assert _layernorm_split_config(mode) in kernel.configs(dtype, size), (name, hidden, mode)


def test_no_fit_entries_name_compiled_cases():
    """Every NO_FIT entry names a kernel, dtype, tf32 setting and head dim of the matrix (a renamed kernel or a
    dropped head dim must not leave a stale entry behind)."""
    by_name = {kernel.name: kernel for kernel in KERNELS}
    for (name, dtype, tf32, head_dim), targets in NO_FIT.items():
        kernel = by_name[name]
        assert dtype in kernel.dtypes and head_dim in kernel.head_dims and tf32 in _tf32_settings(kernel, dtype), name
        assert set(targets) <= set(TARGETS), targets
