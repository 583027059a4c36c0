"""LSTM benchmark: seqkern.nn.LSTM against torch.nn.LSTM (oneDNN on CPU), the eager reference, and
torch.compile of the reference cell, on one layer with input_size = hidden_size, float32.

Every contender gets the same weights (torch.nn.LSTM's, loaded into seqkern's identical state_dict) and
the same inputs. Inference runs under torch.no_grad(); training is the forward plus the backward of
output.sum() + h_n.sum() + c_n.sum() to every parameter and to the input and initial states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import seqkern
from benchmarks.harness import SUBJECT, Call, Case

SEED = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    steps: int
    hidden: int
    training: bool

    @property
    def name(self) -> str:
        return f"{'train' if self.training else 'infer'} b{self.batch} t{self.steps} h{self.hidden}"


DEFAULT_SHAPES = (
    Shape(batch=1, steps=512, hidden=256, training=False),  # streaming: one sequence, latency-bound
    Shape(batch=32, steps=100, hidden=256, training=False),
    Shape(batch=64, steps=50, hidden=512, training=False),
    Shape(batch=32, steps=100, hidden=256, training=True),
    Shape(batch=1, steps=512, hidden=256, training=True),
)
# Small enough that the whole smoke run is dominated by the two torch.compile compilations (~15 s).
QUICK_SHAPES = (
    Shape(batch=3, steps=8, hidden=32, training=False),
    Shape(batch=3, steps=8, hidden=32, training=True),
)


def flops(shape: Shape) -> float:
    """The GEMM work: 2*T*B*4H*(I+H) forward (I = H here); a backward is about twice a forward."""
    forward = 2 * shape.steps * shape.batch * 4 * shape.hidden * (2 * shape.hidden)
    return 3 * forward if shape.training else forward


# --------------------------------------------------------------------------------------------------
# Modules and inputs: rebuilt from the same seed by every contender, so all see identical numbers.
# --------------------------------------------------------------------------------------------------
def _torch_lstm(shape: Shape) -> torch.nn.LSTM:
    torch.manual_seed(SEED)
    return torch.nn.LSTM(shape.hidden, shape.hidden)


def _seqkern_lstm(shape: Shape) -> seqkern.nn.LSTM:
    module = seqkern.nn.LSTM(shape.hidden, shape.hidden)
    module.load_state_dict(_torch_lstm(shape).state_dict())
    return module


def _inputs(shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
    """x (T,B,I), h0 and c0 (1,B,H); leaves that collect gradients when training."""
    generator = torch.Generator().manual_seed(SEED)
    sizes = [(shape.steps, shape.batch, shape.hidden)] + [(1, shape.batch, shape.hidden)] * 2
    x, h0, c0 = (torch.randn(size, generator=generator) for size in sizes)
    return tuple(t.requires_grad_(shape.training) for t in (x, h0, c0))


# Forward(x, h0, c0) -> (output, h_n, c_n): what differs between contenders.
Forward = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _timed_call(forward: Forward, parameters: Sequence[Tensor], shape: Shape,
                context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Call:
    """The call the harness times: inference returns the outputs; training returns the output and the
    gradients of output.sum() + h_n.sum() + c_n.sum() to x, h0, c0 and every parameter."""
    inputs = _inputs(shape)
    if not shape.training:
        def infer() -> Sequence[Tensor]:
            with torch.no_grad(), context():
                return forward(*inputs)
        return infer

    leaves = [*inputs, *parameters]

    def train() -> Sequence[Tensor]:
        with context():
            output, h_n, c_n = forward(*inputs)
            # autograd.grad rather than backward(): fresh gradients every call, none left in .grad to
            # accumulate into or to be freed by the next call (which would blur its peak memory).
            grads = torch.autograd.grad(output.sum() + h_n.sum() + c_n.sum(), leaves)
        return [output.detach(), *grads]
    return train


def _module_forward(module: torch.nn.Module) -> Forward:
    def forward(x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        output, (h_n, c_n) = module(x, (h0, c0))
        return output, h_n, c_n
    return forward


# --------------------------------------------------------------------------------------------------
# torch.compile of the reference cell.
# --------------------------------------------------------------------------------------------------
def _reference_cell_step(x_proj_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step on the input projection x W_ih^T + b_ih + b_hh, gate order i, f, g, o as torch.nn."""
    gates = x_proj_t + h @ w_hh.t()
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


@functools.cache
def _compiled_step() -> Callable[..., tuple[Tensor, Tensor]]:
    """The reference cell under torch.compile, created once per process.

    Dynamo then compiles once per shape and grad mode, on the first call of each case (~2-8 s each here,
    less when inductor's on-disk cache already holds the kernels): 5 compilations for the default set,
    within dynamo's recompile limit of 8 (the harness makes exceeding it an error, not a silent eager run).
    dynamic=False: each case gets code specialised to its shapes, the strongest version of this baseline
    and what a user with a fixed shape gets.
    """
    return torch.compile(_reference_cell_step, fullgraph=True, dynamic=False)


def _compiled_reference_forward(module: torch.nn.LSTM) -> Forward:
    step = _compiled_step()

    def forward(x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The input projection of every step is one GEMM outside the loop, as in the reference.
        x_proj = F.linear(x, module.weight_ih_l0, module.bias_ih_l0 + module.bias_hh_l0)
        h, c = h0[0], c0[0]
        outputs = []
        for x_proj_t in x_proj:
            h, c = step(x_proj_t, h, c, module.weight_hh_l0)
            outputs.append(h)
        return torch.stack(outputs), h.unsqueeze(0), c.unsqueeze(0)
    return forward


# --------------------------------------------------------------------------------------------------
# Contenders and cases.
# --------------------------------------------------------------------------------------------------
def _contenders(shape: Shape) -> dict[str, Callable[[], Call]]:
    """Display name -> setup returning the call to time; the harness runs them one at a time."""
    def module_contender(make_module: Callable[[Shape], torch.nn.Module],
                         context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        def setup() -> Call:
            module = make_module(shape).train(shape.training)
            return _timed_call(_module_forward(module), list(module.parameters()), shape, context)
        return setup

    def compiled_reference() -> Call:
        module = _torch_lstm(shape)
        return _timed_call(_compiled_reference_forward(module), list(module.parameters()), shape)

    return {
        SUBJECT: module_contender(_seqkern_lstm),
        "torch.nn.LSTM": module_contender(_torch_lstm),
        "reference (eager)": module_contender(_seqkern_lstm, context=lambda: seqkern.backend("reference")),
        "torch.compile(reference cell)": compiled_reference,
    }


def _implementation() -> str:
    """Which seqkern implementation serves float32 CPU tensors here ("reference" if the kernels are not built)."""
    return seqkern.backends.resolve("lstm", torch.device("cpu"), torch.float32, seqkern.ops.lstm.SUPPORTED_DTYPES)


def cases(quick: bool = False) -> list[Case]:
    """The default LSTM set, or with `quick` two tiny shapes that exercise every contender cheaply."""
    return [
        Case(
            op="lstm",
            name=shape.name,
            params={**dataclasses.asdict(shape), "input_size": shape.hidden, "dtype": "float32"},
            flops=flops(shape),
            contenders=_contenders(shape),
            notes={"seqkern_implementation": _implementation()},
        )
        for shape in (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    ]
