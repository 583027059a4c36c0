"""Wiring shared by every op: Triton implementations, running them on CPU tensors, and double backward.

The schema of each op comes from seqkern/ops/_schemas.py; its CPU kernel is C++. This module registers
the Triton launcher of an op as its CUDA kernel, and remembers it so that `seqkern.backend("triton")`
can run it on CPU tensors (under the Triton interpreter). That redirection is a TorchDispatchMode: it
sits below autograd, so the forward and the backward ops keep the one autograd formula of the op and only
the kernel underneath changes.

Double backward (one mechanism for every op): the fused backward kernels compute gradients, not a graph.
When a backward runs with grad mode on (torch.autograd.grad(..., create_graph=True)), `register_ops` makes
it recompute the op's forward through its reference (seqkern/reference/<op>.py, composed differentiable
torch ops) from the saved inputs and differentiate that with create_graph=True: the returned gradients then
carry a correct graph (second-order gradients, Hessian-vector products, gradient penalties). Otherwise the
fast backward runs. Each op therefore saves all its inputs (`save_inputs`: references, never copies).
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from seqkern import _triton
from seqkern.ops import _schemas  # noqa: F401  (declares torch.ops.seqkern.*, with or without the C++ kernels)

_TRITON_KERNELS: dict[torch._ops.OpOverload, Callable] = {}


def op(name: str) -> torch._ops.OpOverload:
    """torch.ops.seqkern.<name>.default."""
    return getattr(torch.ops.seqkern, name).default


class Autograd(NamedTuple):
    """The autograd formula of one op.

    backward(ctx, *grad_outputs), setup_context(ctx, inputs, output): as torch.library.register_autograd;
        setup_context must save through `save_inputs`.
    reference: the op's reference forward, same signature and outputs as the op, differentiable.
    differentiable_outputs: positions of the outputs that carry gradients (not workspaces, not the lse).
    """

    backward: Callable
    setup_context: Callable
    reference: Callable
    differentiable_outputs: tuple[int, ...]


def register_ops(fakes: dict[str, Callable], autograd: dict[str, Autograd], triton_module: str) -> None:
    """The Python side of a family of ops (e.g. lstm_forward, lstm_backward, lstm_cell_*):

    `fakes` maps each op name to its fake implementation; `autograd` maps the differentiable ops to their
    formula (their backward becomes differentiable through the reference, see the module docstring); each
    op's Triton launcher `triton_module`.<name> becomes its CUDA kernel if Triton is installed. The schemas
    are Python's, so this holds whether or not the C++ kernels loaded.
    """
    for name, fake in fakes.items():
        torch.library.register_fake(f"seqkern::{name}", fake)
        if _triton.available():
            register_triton(name, triton_module)
    for name, formula in autograd.items():
        register_autograd(name, _twice_differentiable(formula), _unmaterialized(formula.setup_context),
                          composed=formula.reference)


# The library that holds seqkern's Autograd kernels (kept alive: dropping it would unregister them).
_AUTOGRAD_LIBRARY = torch.library.Library("seqkern", "FRAGMENT")


def register_autograd(name: str, backward: Callable, setup_context: Callable,
                      composed: Callable | None = None) -> None:
    """torch.library.register_autograd(f"seqkern::{name}", backward, setup_context=setup_context), the same
    Autograd kernel (an autograd.Function whose forward runs the op below autograd) without the per-call cost
    of torch's: its forward calls torch._library.utils.fill_defaults on every call that saves for backward,
    which reads op._schema.arguments (a fresh list of pybind objects) once per argument, ~36 us a call at our
    ~15 arguments (seqkern.nn.RNN(16, 16) training at x (1, 1, 16): 225 us a call against torch.nn's 102; NOTES.md
    "Round 13"). seqkern's schemas have no default values and no keyword-only arguments (checked here), so the
    arguments the kernel receives are always all of them and setup_context gets them as they come.

    Where the fused kernels cannot carry the derivative, the call runs `composed` instead (the op's reference:
    composed torch ops), or raises where there is none:
      * forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad), an argument carrying a tangent: both
        kernels (torch's and this one) otherwise run the op below autograd whenever no argument requires grad,
        which drops the tangents (torch.func.jvp through seqkern.nn.GRU returned a tangent of zeros);
      * functorch's grad transform (torch.func.grad, vjp, jacrev, hessian, vmap of grad): autograd.Function.apply
        from inside an Autograd kernel fails there (torch raises "must override the setup_context staticmethod",
        or with one "could not find kernel for ... custom_function_call at AutogradCPU").
    vmap alone runs functorch's per-sample fallback, which calls this kernel on plain tensors."""
    overload = op(name)
    if any(a.has_default_value() or a.kwarg_only for a in overload._schema.arguments):
        raise RuntimeError(f"seqkern::{name}: register_autograd assumes no default values and no keyword-only "
                           f"arguments (setup_context gets the arguments as passed), got {overload._schema}")

    def run_below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def forward(ctx, *args_and_keyset):
        *args, keyset = args_and_keyset
        result = run_below_autograd(keyset, args)
        setup_context(ctx, tuple(args), result)
        return result

    def backward_without_keyset(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-1]  # the formula sees the op's arguments only
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return (*result, None) if isinstance(result, tuple) else (result, None)

    function = type(f"SeqkernAutograd_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_without_keyset)})

    def autograd_kernel(keyset, *args):
        if carries_tangent(*args) or _under_functorch_grad(keyset):
            if composed is None:
                raise RuntimeError(f"seqkern::{name} has no derivative for torch.func transforms or forward-mode "
                                   f"AD (jvp, jacfwd, grad, jacrev, torch.autograd.forward_ad)")
            return composed(*args)
        if torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        return run_below_autograd(keyset, args)

    _AUTOGRAD_LIBRARY.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def carries_tangent(*args) -> bool:
    """Whether forward-mode AD is on and an argument is a dual tensor at its innermost level (a tangent rides on
    it); outside forward AD one integer comparison."""
    return forward_ad._current_level >= 0 and any(
        isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def _under_functorch_grad(keyset) -> bool:
    """Whether functorch's grad transform (torch.func.grad, vjp, jacrev, ...) dispatched this call: its
    interpreter is the innermost one (outside functorch the key set has no FuncTorch key: one test)."""
    if not keyset.has(torch._C.DispatchKey.FuncTorchDynamicLayerBackMode):
        return False
    interpreter = torch._C._functorch.peek_interpreter_stack()
    return interpreter is not None and interpreter.key() == torch._C._functorch.TransformType.Grad


def _unmaterialized(setup_context: Callable) -> Callable:
    """setup_context, with autograd told to pass None (not zeros) for outputs nobody differentiated: the
    workspaces every training call returns would otherwise be zero-filled on each backward (a 13 MB fill,
    3.4 ms of a 200 ms LSTM step at b32 t100 h256, one thread). Backward formulas take None through
    `zeros_if_none` where their kernel wants a tensor."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    return setup


def register_no_autograd(name: str, alternative: str) -> None:
    """An op with no autograd formula: differentiating through it raises an error naming the op and
    `alternative` (what to call instead), where torch would only warn and return no gradient."""

    def refuse(ctx, *grads):
        raise RuntimeError(f"seqkern::{name} has no autograd formula: {alternative}")

    register_autograd(name, refuse, lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------------------------------
# Saved inputs and the differentiable backward.
# --------------------------------------------------------------------------------------------------
_SAVED = object()  # marks an input slot held by ctx.save_for_backward


def save_inputs(ctx, inputs: tuple, *extra: Tensor | None) -> None:
    """Save every input of the op (tensors and None through save_for_backward, by reference; the other
    arguments on ctx) and the `extra` tensors its fast backward reads (outputs, workspaces)."""
    ctx.input_layout = tuple(_SAVED if a is None or isinstance(a, Tensor) else a for a in inputs)
    tensors = [a for a, slot in zip(inputs, ctx.input_layout) if slot is _SAVED]
    ctx.save_for_backward(*tensors, *extra)


def saved_inputs(ctx) -> tuple[tuple, tuple]:
    """(the op's inputs as it was called, the extra tensors) saved by `save_inputs`."""
    saved = iter(ctx.saved_tensors)
    inputs = tuple(next(saved) if slot is _SAVED else slot for slot in ctx.input_layout)
    return inputs, tuple(saved)


def _twice_differentiable(formula: Autograd) -> Callable:
    """formula.backward, except under create_graph=True: gradients through the reference, with a graph."""

    def backward(ctx, *grad_outputs):
        if not torch.is_grad_enabled():  # create_graph=False: the fused kernel
            return formula.backward(ctx, *grad_outputs)
        inputs, _ = saved_inputs(ctx)
        return reference_gradients(formula, inputs, grad_outputs, ctx.needs_input_grad)

    return backward


def reference_gradients(formula: Autograd, inputs: tuple, grad_outputs: tuple, needs_input_grad) -> tuple:
    """The gradients of formula.reference(*inputs) (one per input, None where not needed) against
    `grad_outputs`, computed with create_graph=True so that they are differentiable in the inputs and in
    grad_outputs. Costs the reference's forward and backward (time and memory of the composed math)."""
    wanted = [i for i, needed in enumerate(needs_input_grad) if needed]
    grads: list[Tensor | None] = [None] * len(inputs)
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        # Fresh aliases (views: no copies) of the inputs to differentiate: an input may itself depend on
        # another (gates_h = hx W_hh^T, with hx passed too), and the gradient with respect to the input
        # tensor itself would then count that path twice. Each alias is reached only through this op.
        inputs = tuple(t.view_as(t) if needed else t for t, needed in zip(inputs, needs_input_grad))
        outputs = formula.reference(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    pairs = [(outputs[i], grad_outputs[i]) for i in formula.differentiable_outputs
             if grad_outputs[i] is not None and outputs[i].requires_grad]
    results = torch.autograd.grad(
        [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
        create_graph=True, allow_unused=True, materialize_grads=True,
    ) if pairs else [torch.zeros_like(inputs[i]) for i in wanted]
    for i, g in zip(wanted, results):
        grads[i] = g
    return tuple(grads)


def register_triton(name: str, module: str) -> None:
    """Make `module`.<name> (a Triton launcher with the op's signature) the CUDA kernel of seqkern::<name>.

    The module is imported at the first call, so `import seqkern` does not pay for importing triton.
    """

    def launcher(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    torch.library.register_kernel(f"seqkern::{name}", "cuda", launcher)
    _TRITON_KERNELS[op(name)] = launcher


class TritonOnCPU(TorchDispatchMode):
    """While the "triton" backend is in force, runs seqkern ops through their Triton launchers whatever
    the device (CPU tensors: under the interpreter). Entered by `seqkern.backend("triton")`, so a direct
    `torch.ops.seqkern.*` call in that block runs Triton too, and by `kernel_scope` for $SEQKERN_BACKEND."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from seqkern import backends

        launcher = _TRITON_KERNELS.get(func)
        if launcher is None or backends.current() != "triton":
            return func(*args, **(kwargs or {}))
        return launcher(*args, **(kwargs or {}))


def kernel_scope(impl: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context in which torch.ops.seqkern.* runs the kernel of `impl` ("cpu" | "triton") on `device`."""
    if impl == "triton" and device.type != "cuda":
        return TritonOnCPU()
    return contextlib.nullcontext()


def empty(like: Tensor) -> Tensor:
    """The (0,)-shaped tensor an op returns for a result its flags leave out."""
    return like.new_empty(0)


def zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    """Autograd passes None for an output nobody used; the backward kernels want zeros."""
    return torch.zeros_like(like) if grad is None else grad


def uses_state_flags(lengths: Tensor | None, resets: Tensor | None, zoneout: float = 0.0) -> bool:
    """Whether a recurrent layer call uses lengths, resets or zoneout (seqkern/ops/_schemas.py)."""
    return lengths is not None or resets is not None or zoneout != 0.0


def state_flag_route(impl: str, flag_backends: tuple[str, ...], lengths: Tensor | None, resets: Tensor | None,
                     zoneout: float = 0.0, sorted_lengths: tuple[str, ...] = ()) -> str:
    """How a recurrent layer call runs on backend `impl`, whose kernel implements lengths, resets and zoneout iff
    impl is in flag_backends: "kernel" (the op), "reference", or "sorted": lengths alone run as the batch_sizes of
    the rows sorted by length (`lengths_as_batch_sizes`), as torch.nn runs pack_padded_sequence(enforce_sorted=
    False), on a kernel without lengths or on one of `sorted_lengths` (where that is the faster way)."""
    if impl == "reference":
        return "reference"
    if not uses_state_flags(lengths, resets, zoneout):
        return "kernel"
    lengths_alone = resets is None and zoneout == 0.0
    if lengths_alone and (impl in sorted_lengths or impl not in flag_backends):
        return "sorted"
    return "kernel" if impl in flag_backends else "reference"


def lengths_as_batch_sizes(lengths: Tensor, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """lengths (B,) -> order (B,) (rows by decreasing length), its inverse permutation, and the batch_sizes (T,)
    int64 CPU tensor of the sorted rows. Tensor ops only (no data-dependent Python), so torch.compile keeps one
    graph; the caller pays a copy of the input and outputs in sorted order."""
    order = torch.argsort(lengths, descending=True, stable=True)
    steps = torch.arange(seq_len, device=lengths.device)
    batch_sizes = (lengths[None, :] > steps[:, None]).sum(1).cpu()
    return order, torch.argsort(order), batch_sizes


def needs_grad(*args) -> bool:
    """Whether a forward must save what its backward needs: grad mode on and a tensor among `args` requires grad
    (other arguments, None included, are passed over). Eagerly torch's own test, as register_autograd's kernel makes
    it (a Python loop over a recurrent op's ~13 arguments took ~2.3 us of a one-step call, it ~1 us); dynamo cannot
    trace that builtin, so under torch.compile the loop."""
    if not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return any(isinstance(a, Tensor) and a.requires_grad for a in args)
    return torch._C._any_requires_grad(*args)


def run_op(name: str, *args):
    """torch.ops.seqkern.<name>(*args), entered below autograd where nothing differentiates the call: no gradient
    needed (needs_grad), no tangent (carries_tangent), no functorch transform, torch.compile not tracing. That is
    what the op's Autograd kernel does itself then (register_autograd's run_below_autograd), without the cost of
    reaching it: the dispatcher boxes the arguments into Python, the kernel checks them and redispatches back (a
    one-step GRU cell op 7.6-8.2 -> 5.4-5.8 us; NOTES.md "Round 16"). A TorchDispatchMode (seqkern's TritonOnCPU, a
    user's) still sees the call: it sits below autograd."""
    overload = op(name)
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or differentiated(*args)):
        return overload(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return overload(*args)


def differentiated(*args) -> bool:
    """Whether a call on `args` (its tensors; other arguments are passed over) is differentiated by either mode: a gradient needed (needs_grad) or a tangent
    riding on one of them (carries_tangent). A kernel without a derivative (the decode op) must not serve it."""
    return needs_grad(*args) or carries_tangent(*args)
