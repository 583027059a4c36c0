"""What the recurrent-layer benchmarks (bench_lstm.py, bench_gru.py, bench_rnn.py) share.

A benchmark module describes its layer as a `RecurrentLayer` and lists its `Shape`s; this module builds the
cases: seqkern.nn.<Layer> against torch.nn.<Layer>, the eager reference, and torch.compile of the reference
cell, on one layer with input_size = hidden_size, float32 and bfloat16 (every contender in the case's dtype). The
correctness gate compares seqkern and torch.nn against torch.nn in float64 on the same (rounded) weights and inputs.

Every contender gets the same weights (torch.nn's, loaded into seqkern's identical state_dict) and the same
inputs. Inference runs under torch.no_grad(); training is the forward plus the backward of
output.sum() + the sum of every final state to every parameter and to the input and initial states.

Not a benchmark itself: the runner only picks up modules named bench_<op>.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from benchmarks.harness import SUBJECT, Call, Case, dtype_suffix

SEED = 0

# States (B,H) in the layer's order: (h,) or (h, c).
States = tuple[Tensor, ...]
# A reference cell step: (gates_x_t (B,G*H), *states, w_hh (G*H,H)[, b_hh (G*H,)]) -> the new states.
CellStep = Callable[..., States]


@dataclasses.dataclass(frozen=True)
class RecurrentLayer:
    """What sets one recurrent layer's benchmark apart from another's.

    `gate_blocks` is G in the (G*H, H) weight matrices (LSTM 4, GRU 3, RNN 1), for the FLOP count.
    `num_states` is 2 for LSTM, whose modules take and return hx as a tuple (h, c), and 1 for the layers
    whose hx is the tensor h. `cell_step` is the reference step torch.compile compiles; it gets b_hh as its
    last argument when `hidden_bias_in_step` (GRU: r multiplies the n part of W_hh h + b_hh), otherwise
    b_hh is folded into the input projection with b_ih.
    """

    op: str
    torch_class: type[torch.nn.RNNBase]
    seqkern_class: type[torch.nn.RNNBase]
    gate_blocks: int
    num_states: int
    cell_step: CellStep
    hidden_bias_in_step: bool = False
    # Constructor keyword arguments both modules get (e.g. nonlinearity); recorded in every case's params.
    module_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One timed shape: x is (steps, batch, hidden), input_size = hidden_size; training adds the backward."""

    batch: int
    steps: int
    hidden: int
    training: bool
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        mode = "train" if self.training else "infer"
        return f"{mode} b{self.batch} t{self.steps} h{self.hidden}{dtype_suffix(self.dtype)}"


# The shapes every recurrent layer is timed on, split so that a layer can add its own between them and keep
# inference rows before training rows.
INFERENCE_SHAPES = (
    Shape(batch=1, steps=512, hidden=256, training=False),  # streaming: one sequence, latency-bound
    Shape(batch=32, steps=100, hidden=256, training=False),
)
TRAINING_SHAPES = (
    Shape(batch=32, steps=100, hidden=256, training=True),
    Shape(batch=1, steps=512, hidden=256, training=True),
)
# bfloat16 against torch.nn in bfloat16 (oneDNN with AMX for the LSTM on the Intel machines).
BF16_SHAPES = (
    Shape(batch=32, steps=100, hidden=256, training=False, dtype=torch.bfloat16),
    Shape(batch=32, steps=100, hidden=256, training=True, dtype=torch.bfloat16),
)
# One step of a small layer, as an agent acting or an online decoder calls it: the time is the per-call overhead
# (Python, dispatch, autograd, allocations, packing), not the products.
STEP_SHAPES = (
    Shape(batch=1, steps=1, hidden=64, training=False),
    Shape(batch=1, steps=1, hidden=64, training=True),
)
# Small enough that the whole smoke run of one op is dominated by its two torch.compile compilations (~15 s).
QUICK_SHAPES = (
    Shape(batch=3, steps=8, hidden=32, training=False),
    Shape(batch=3, steps=8, hidden=32, training=True),
)


def flops(layer: RecurrentLayer, shape: Shape) -> float:
    """The GEMM work: 2*T*B*G*H*(I+H) forward (I = H here); a backward is about twice a forward."""
    forward = 2 * shape.steps * shape.batch * layer.gate_blocks * shape.hidden * (2 * shape.hidden)
    return 3 * forward if shape.training else forward


# --------------------------------------------------------------------------------------------------
# Modules and inputs: rebuilt from the same seed by every contender, so all see identical numbers.
# --------------------------------------------------------------------------------------------------
def _torch_module(layer: RecurrentLayer, shape: Shape, compute_dtype: torch.dtype | None = None) -> torch.nn.RNNBase:
    """torch.nn's layer with the seed's weights rounded to the shape's dtype, held in `compute_dtype` (default:
    that dtype; float64 for the gate's oracle)."""
    torch.manual_seed(SEED)
    module = layer.torch_class(shape.hidden, shape.hidden, **layer.module_kwargs).to(shape.dtype)
    return module.to(compute_dtype or shape.dtype)


def _seqkern_module(layer: RecurrentLayer, shape: Shape) -> torch.nn.RNNBase:
    module = layer.seqkern_class(shape.hidden, shape.hidden, **layer.module_kwargs).to(shape.dtype)
    module.load_state_dict(_torch_module(layer, shape).state_dict())
    return module


def _inputs(layer: RecurrentLayer, shape: Shape, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, States]:
    """x (T,B,I) and the initial states, each (1,B,H), rounded to the shape's dtype and held in `compute_dtype`;
    leaves that collect gradients when training."""
    generator = torch.Generator().manual_seed(SEED)
    sizes = [(shape.steps, shape.batch, shape.hidden)] + [(1, shape.batch, shape.hidden)] * layer.num_states
    x, *states = (
        torch.randn(size, generator=generator).to(shape.dtype).to(compute_dtype or shape.dtype)
        .requires_grad_(shape.training)
        for size in sizes
    )
    return x, tuple(states)


# Forward(x (T,B,I), initial states (1,B,H) each) -> (output (T,B,H), final states (1,B,H) each): what
# differs between contenders.
Forward = Callable[[Tensor, States], tuple[Tensor, States]]


def _timed_call(layer: RecurrentLayer, forward: Forward, parameters: Sequence[Tensor], shape: Shape,
                context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                compute_dtype: torch.dtype | None = None) -> Call:
    """The call the harness times: inference returns the output and final states; training returns the
    output and the gradients of output.sum() + the final states' sums to x, the initial states and every
    parameter."""
    x, states = _inputs(layer, shape, compute_dtype)
    if not shape.training:
        def infer() -> Sequence[Tensor]:
            with torch.no_grad(), context():
                output, final_states = forward(x, states)
            return (output, *final_states)
        return infer

    leaves = [x, *states, *parameters]

    def train() -> Sequence[Tensor]:
        with context():
            output, final_states = forward(x, states)
            loss = sum(t.sum() for t in (output, *final_states))
            # autograd.grad rather than backward(): fresh gradients every call, none left in .grad to
            # accumulate into or to be freed by the next call (which would blur its peak memory).
            grads = torch.autograd.grad(loss, leaves)
        return [output.detach(), *grads]
    return train


def _module_forward(layer: RecurrentLayer, module: torch.nn.Module) -> Forward:
    """The module's own call, with hx and the final state as the tuple (h, c) for LSTM and the tensor h otherwise."""
    def forward(x: Tensor, states: States) -> tuple[Tensor, States]:
        output, final = module(x, states if layer.num_states > 1 else states[0])
        return output, tuple(final) if layer.num_states > 1 else (final,)
    return forward


# --------------------------------------------------------------------------------------------------
# torch.compile of the reference cell.
# --------------------------------------------------------------------------------------------------
@functools.cache
def _compiled(step: CellStep) -> CellStep:
    """A layer's reference cell step under torch.compile, created once per process.

    Dynamo then compiles once per shape and grad mode, on the first call of each case (~2-10 s each here,
    less when inductor's on-disk cache already holds the kernels). The recompile limit counts per step
    function, so per op: the harness raises it to 16 for the LSTM's 9 default shapes (the GRU's and RNN's 8) and
    makes exceeding it an error, not a silent eager run. dynamic=False: each case gets code
    specialised to its shapes, the strongest version of this baseline and what a user with a fixed shape gets.
    """
    return torch.compile(step, fullgraph=True, dynamic=False)


def _compiled_reference_forward(layer: RecurrentLayer, module: torch.nn.RNNBase) -> Forward:
    """The compiled step looped over time in Python, as a user of torch.compile would write the layer.

    The bias sum is taken inside every call, not once here, so that training differentiates it each time.
    """
    step = _compiled(layer.cell_step)
    step_weights = (module.weight_hh_l0, module.bias_hh_l0) if layer.hidden_bias_in_step else (module.weight_hh_l0,)

    def forward(x: Tensor, initial_states: States) -> tuple[Tensor, States]:
        input_bias = module.bias_ih_l0 if layer.hidden_bias_in_step else module.bias_ih_l0 + module.bias_hh_l0
        # The input projection of every step is one GEMM outside the loop, as in the reference.
        gates_x = F.linear(x, module.weight_ih_l0, input_bias)
        states = tuple(state[0] for state in initial_states)
        outputs = []
        for gates_x_t in gates_x:
            states = step(gates_x_t, *states, *step_weights)
            outputs.append(states[0])
        return torch.stack(outputs), tuple(state.unsqueeze(0) for state in states)
    return forward


# --------------------------------------------------------------------------------------------------
# Contenders and cases.
# --------------------------------------------------------------------------------------------------
def _contenders(layer: RecurrentLayer, shape: Shape) -> dict[str, Callable[[], Call]]:
    """Display name -> setup returning the call to time; the harness runs them one at a time."""
    def module_contender(make_module: Callable[[RecurrentLayer, Shape], torch.nn.Module],
                         context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        def setup() -> Call:
            module = make_module(layer, shape).train(shape.training)
            return _timed_call(layer, _module_forward(layer, module), list(module.parameters()), shape, context)
        return setup

    def compiled_reference() -> Call:
        module = _torch_module(layer, shape)
        return _timed_call(layer, _compiled_reference_forward(layer, module), list(module.parameters()), shape)

    return {
        SUBJECT: module_contender(_seqkern_module),
        _torch_name(layer): module_contender(_torch_module),
        "reference (eager)": module_contender(_seqkern_module, context=lambda: seqkern.backend("reference")),
        "torch.compile(reference cell)": compiled_reference,
    }


def _torch_name(layer: RecurrentLayer) -> str:
    return f"torch.nn.{layer.torch_class.__name__}"


def _oracle(layer: RecurrentLayer, shape: Shape) -> Callable[[], Sequence[Tensor]]:
    """The gate's float64 oracle: torch.nn's layer in float64 on the same (rounded) weights and inputs."""
    def oracle() -> Sequence[Tensor]:
        module = _torch_module(layer, shape, torch.float64).train(shape.training)
        call = _timed_call(layer, _module_forward(layer, module), list(module.parameters()), shape,
                           compute_dtype=torch.float64)
        return call()
    return oracle


def _implementation(op: str, dtype: torch.dtype) -> str:
    """Which seqkern implementation serves CPU tensors of `dtype` for `op` here ("reference" until its kernel is
    registered or when the extension is not built)."""
    supported = getattr(seqkern.ops, op).SUPPORTED_DTYPES
    return seqkern.backends.resolve(op, torch.device("cpu"), dtype, supported)


def cases(layer: RecurrentLayer, default_shapes: Sequence[Shape], quick: bool = False) -> list[Case]:
    """The layer's default set, or with `quick` two tiny shapes that exercise every contender cheaply."""
    return [
        Case(
            op=layer.op,
            name=shape.name,
            params={**dataclasses.asdict(shape), "input_size": shape.hidden,
                    "dtype": str(shape.dtype).removeprefix("torch."), **layer.module_kwargs},
            flops=flops(layer, shape),
            contenders=_contenders(layer, shape),
            notes={"seqkern_implementation": _implementation(layer.op, shape.dtype)},
            oracle=_oracle(layer, shape),
            rule_baseline=_torch_name(layer),
        )
        for shape in (QUICK_SHAPES if quick else default_shapes)
    ]


# --------------------------------------------------------------------------------------------------
# Variable lengths (issue 16): seqkern's `lengths` against torch.nn on pack_padded_sequence + pad_packed_sequence.
# --------------------------------------------------------------------------------------------------
LENGTHS_SHAPES = (
    Shape(batch=32, steps=100, hidden=256, training=False),
    Shape(batch=32, steps=100, hidden=256, training=True),
)
QUICK_LENGTHS_SHAPES = (Shape(batch=3, steps=8, hidden=32, training=True),)


def spread_lengths(shape: Shape, shortest: int = 10) -> Tensor:
    """(B,) lengths spread evenly over [min(shortest, T), T], in a seeded random order (unsorted)."""
    spread = torch.linspace(min(shortest, shape.steps), shape.steps, shape.batch).round().long()
    return spread[torch.randperm(shape.batch, generator=torch.Generator().manual_seed(SEED))]


def _packed_forward(layer: RecurrentLayer, module: torch.nn.Module, lengths: Tensor) -> Forward:
    """torch.nn's way: pack (sorting the rows), run, pad back to T."""
    def forward(x: Tensor, states: States) -> tuple[Tensor, States]:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        output, final = module(packed, states if layer.num_states > 1 else states[0])
        output, _ = pad_packed_sequence(output, total_length=x.shape[0])
        return output, tuple(final) if layer.num_states > 1 else (final,)
    return forward


def _flagged_forward(flag: str) -> Callable[[RecurrentLayer, torch.nn.Module, Tensor], Forward]:
    """seqkern's module called with the state flag `flag` (lengths= or resets=) set to the case's tensor."""
    def make(layer: RecurrentLayer, module: torch.nn.Module, value: Tensor) -> Forward:
        def forward(x: Tensor, states: States) -> tuple[Tensor, States]:
            output, final = module(x, states if layer.num_states > 1 else states[0], **{flag: value})
            return output, tuple(final) if layer.num_states > 1 else (final,)
        return forward
    return make


def _flagged_case(layer: RecurrentLayer, shape: Shape, flag: str, value: Tensor, baseline: str,
                  baseline_forward: Callable[[RecurrentLayer, torch.nn.Module, Tensor], Forward], name: str,
                  flops_share: float, params: dict) -> Case:
    """seqkern.nn.<Layer>(x, hx, <flag>=value) against `baseline_forward` on torch.nn's module (also the
    float64 oracle); `flops_share` of the full layer's work is what either contender must do."""
    def contender(make_module, make_forward):
        def setup() -> Call:
            module = make_module(layer, shape).train(shape.training)
            return _timed_call(layer, make_forward(layer, module, value), list(module.parameters()), shape)
        return setup

    def oracle() -> Sequence[Tensor]:
        module = _torch_module(layer, shape, torch.float64).train(shape.training)
        return _timed_call(layer, baseline_forward(layer, module, value), list(module.parameters()), shape,
                           compute_dtype=torch.float64)()

    return Case(
        op=layer.op, name=f"{shape.name} {name}",
        params={**dataclasses.asdict(shape), "input_size": shape.hidden, "dtype": "float32", **params},
        flops=flops(layer, shape) * flops_share,
        contenders={SUBJECT: contender(_seqkern_module, _flagged_forward(flag)),
                    baseline: contender(_torch_module, baseline_forward)},
        notes={"seqkern_implementation": _implementation(layer.op, shape.dtype)},
        oracle=oracle, rule_baseline=baseline,
    )


def lengths_cases(layer: RecurrentLayer, quick: bool = False) -> list[Case]:
    """seqkern.nn.<Layer>(x, hx, lengths=...) against torch.nn.<Layer> on the packed sequence, padded back."""
    def case(shape: Shape) -> Case:
        lengths = spread_lengths(shape)
        # The work on the valid steps only: what either contender must do.
        return _flagged_case(layer, shape, "lengths", lengths, f"{_torch_name(layer)} + pack/pad", _packed_forward,
                             f"lengths {int(lengths.min())}..{int(lengths.max())}",
                             float(lengths.sum()) / (shape.steps * shape.batch), {"lengths": lengths.tolist()})
    return [case(shape) for shape in (QUICK_LENGTHS_SHAPES if quick else LENGTHS_SHAPES)]


# --------------------------------------------------------------------------------------------------
# Episode resets (issue 16): seqkern's `resets` against the loop RL code writes without them, torch.nn's cell per
# step with the state replaced by the initial one where an episode starts.
# --------------------------------------------------------------------------------------------------
RESETS_SHAPES = LENGTHS_SHAPES
QUICK_RESETS_SHAPES = QUICK_LENGTHS_SHAPES
CELL_CLASSES = {torch.nn.LSTM: torch.nn.LSTMCell, torch.nn.GRU: torch.nn.GRUCell, torch.nn.RNN: torch.nn.RNNCell}


def episode_resets(shape: Shape, rate: float = 0.02) -> Tensor:
    """(T,B) bool: an episode starts at each step of each row with probability `rate` (seeded)."""
    return torch.rand(shape.steps, shape.batch, generator=torch.Generator().manual_seed(SEED)) < rate


def _cell_loop_forward(layer: RecurrentLayer, module: torch.nn.RNNBase, resets: Tensor) -> Forward:
    """torch.nn's cell (sharing the layer's parameters) stepped in Python, the state restarted where resets says."""
    cell = CELL_CLASSES[layer.torch_class](module.input_size, module.hidden_size, **layer.module_kwargs)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(cell, name, getattr(module, f"{name}_l0"))

    def forward(x: Tensor, states: States) -> tuple[Tensor, States]:
        initial = tuple(s[0] for s in states)
        state, outputs = initial, []
        for t in range(x.shape[0]):
            state = tuple(torch.where(resets[t, :, None], s0, s) for s0, s in zip(initial, state))
            new = cell(x[t], state if layer.num_states > 1 else state[0])
            state = tuple(new) if layer.num_states > 1 else (new,)
            outputs.append(state[0])
        return torch.stack(outputs), tuple(s[None] for s in state)
    return forward


def resets_cases(layer: RecurrentLayer, quick: bool = False) -> list[Case]:
    """seqkern.nn.<Layer>(x, hx, resets=...) against torch.nn's cell stepped in Python with the resets applied."""
    def case(shape: Shape) -> Case:
        resets = episode_resets(shape, rate=0.2 if quick else 0.02)  # the quick shape's few steps still reset
        return _flagged_case(layer, shape, "resets", resets, f"{_torch_name(layer)}Cell loop", _cell_loop_forward,
                             f"resets {int(resets.sum())}", 1.0, {"resets": int(resets.sum())})
    return [case(shape) for shape in (QUICK_RESETS_SHAPES if quick else RESETS_SHAPES)]
