"""LayerNorm LSTM benchmark (issue 16 item 5): seqkern.nn.LayerNormLSTM against its definition composed in eager
PyTorch (F.layer_norm, the gates, the updates, a Python loop over time) and against the same loop around the
composed cell under torch.compile (compiled once per shape, outside the timing: the harness makes the first call
before timing). Targets: training b32 t100 h256 >= 4x eager, >= 1.5x compiled. torch.nn has no LayerNorm LSTM,
so the correctness gate's oracle is the composed definition in float64 and its rule baseline the eager one.

bench_layernorm_gru.py describes the LayerNorm GRU with the same machinery (`LayerNormLayer`, `cases`).
"""
from __future__ import annotations

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
class LayerNormLayer:
    """One LayerNorm recurrent layer: its module class, G, the number of states and the composed step
    step(gx_t (B,G*H) = LN(x W_ih^T) + input bias, *states, params dict) -> new states."""

    op: str
    module_class: type[torch.nn.Module]
    gate_blocks: int
    num_states: int
    step: Callable[..., tuple[Tensor, ...]]
    # Whether b_hh joins the input side (LSTM) or stays in the step (GRU: it sits inside LN(h W_hh^T) + b_hh).
    hidden_bias_in_step: bool


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
    Shape(batch=32, steps=100, hidden=256, training=False),
    Shape(batch=32, steps=100, hidden=256, training=True),  # the target row
    Shape(batch=1, steps=256, hidden=256, training=True),   # below the thread count: the row split's weak spot
)
QUICK_SHAPES = (Shape(batch=3, steps=8, hidden=32, training=False), Shape(batch=3, steps=8, hidden=32, training=True))


def lstm_step(gx: Tensor, h: Tensor, c: Tensor, p: dict[str, Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """gates = gx + LN(h W_hh^T); c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(LN(c'))."""
    gates = gx + F.layer_norm(h @ p["weight_hh"].t(), (gx.shape[-1],), p["ln_hh_weight"], p["ln_hh_bias"], eps)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, (c.shape[-1],), p["ln_cell_weight"], p["ln_cell_bias"], eps))
    return h, c


LAYER = LayerNormLayer("layernorm_lstm", seqkern.nn.LayerNormLSTM, 4, 2, lstm_step, hidden_bias_in_step=False)


def flops(layer: LayerNormLayer, shape: Shape) -> float:
    """The GEMM work, 2*T*B*G*H*(I+H) forward (I = H), a backward about twice that."""
    forward = 2 * shape.steps * shape.batch * layer.gate_blocks * shape.hidden * 2 * shape.hidden
    return 3 * forward if shape.training else forward


def _module(layer: LayerNormLayer, shape: Shape, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The seed's module, LayerNorm parameters moved off their 1 / 0 start so that they matter, and the recurrent
    term's LayerNorm gain halved: at gain 1 this random layer is chaotic over 100 steps (fp32's own gradient error
    against float64 reaches 0.1-1, so the correctness gate would compare noise); at 0.5 the recurrence contracts.
    The work timed is the same."""
    torch.manual_seed(SEED)
    module = layer.module_class(shape.hidden, shape.hidden)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
            if name.startswith("ln_hh_weight"):
                p.mul_(0.5)
    return module.to(dtype).train(shape.training)


def _inputs(layer: LayerNormLayer, shape: Shape, dtype: torch.dtype) -> tuple[Tensor, tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(SEED)
    sizes = [(shape.steps, shape.batch, shape.hidden)] + [(1, shape.batch, shape.hidden)] * layer.num_states
    x, *states = (torch.randn(size, generator=generator).to(dtype).requires_grad_(shape.training) for size in sizes)
    return x, tuple(states)


def _composed_forward(layer: LayerNormLayer, module: torch.nn.Module, step) -> Callable:
    """The composed layer: LN of the input projection for all steps at once, then `step` looped over time."""
    p = {name.removesuffix("_l0"): param for name, param in module.named_parameters()}
    eps = module.eps

    def forward(x: Tensor, states: tuple[Tensor, ...]):
        g = layer.gate_blocks * module.hidden_size
        gx = F.layer_norm(x @ p["weight_ih"].t(), (g,), p["ln_ih_weight"], p["ln_ih_bias"], eps)
        gx = gx + (p["bias_ih"] if layer.hidden_bias_in_step else p["bias_ih"] + p["bias_hh"])
        states = tuple(s[0] for s in states)
        outputs = []
        for gx_t in gx:
            states = step(gx_t, *states, p, eps)
            outputs.append(states[0])
        return torch.stack(outputs), tuple(s.unsqueeze(0) for s in states)
    return forward


@functools.cache
def _compiled(step):
    """The composed step under torch.compile, once per process (dynamo compiles once per shape and grad mode)."""
    return torch.compile(step, fullgraph=True, dynamic=False)


def _module_forward(layer: LayerNormLayer, module: torch.nn.Module) -> Callable:
    def forward(x: Tensor, states: tuple[Tensor, ...]):
        output, final = module(x, states if layer.num_states > 1 else states[0])
        return output, tuple(final) if layer.num_states > 1 else (final,)
    return forward


def _timed_call(layer: LayerNormLayer, shape: Shape, forward: Callable, module: torch.nn.Module,
                dtype: torch.dtype = torch.float32) -> Call:
    """Inference: output and final states. Training: output and the gradients of output.sum() + the final
    states' sums to x, the initial states and every parameter."""
    x, states = _inputs(layer, shape, dtype)
    if not shape.training:
        def infer() -> Sequence[Tensor]:
            with torch.no_grad():
                output, finals = forward(x, states)
            return (output, *finals)
        return infer
    leaves = [x, *states, *module.parameters()]

    def train() -> Sequence[Tensor]:
        output, finals = forward(x, states)
        grads = torch.autograd.grad(sum(t.sum() for t in (output, *finals)), leaves)
        return [output.detach(), *grads]
    return train


def _contenders(layer: LayerNormLayer, shape: Shape) -> dict[str, Callable[[], Call]]:
    def seqkern_module() -> Call:
        module = _module(layer, shape)
        return _timed_call(layer, shape, _module_forward(layer, module), module)

    def composed(step_of: Callable) -> Callable[[], Call]:
        def setup() -> Call:
            module = _module(layer, shape)
            return _timed_call(layer, shape, _composed_forward(layer, module, step_of(layer.step)), module)
        return setup

    return {SUBJECT: seqkern_module, "composed (eager)": composed(lambda s: s),
            "torch.compile(composed cell)": composed(_compiled)}


def _oracle(layer: LayerNormLayer, shape: Shape) -> Callable[[], Sequence[Tensor]]:
    def oracle() -> Sequence[Tensor]:
        module = _module(layer, shape, torch.float64)
        return _timed_call(layer, shape, _composed_forward(layer, module, layer.step), module, torch.float64)()
    return oracle


def layer_cases(layer: LayerNormLayer, quick: bool = False) -> list[Case]:
    impl = seqkern.backends.resolve(layer.op, torch.device("cpu"), torch.float32,
                                    getattr(seqkern.ops, layer.op).SUPPORTED_DTYPES)
    return [
        Case(op=layer.op, name=shape.name, params={**dataclasses.asdict(shape), "input_size": shape.hidden},
             flops=flops(layer, shape), contenders=_contenders(layer, shape),
             notes={"seqkern_implementation": impl}, oracle=_oracle(layer, shape), rule_baseline="composed (eager)")
        for shape in (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    ]


def cases(quick: bool = False) -> list[Case]:
    """The default LayerNorm LSTM set, or with `quick` two tiny shapes."""
    return layer_cases(LAYER, quick)
