"""Forward-mode AD support, checked at ``convert`` time.

Every block a tangent stream will cross is run once under ``torch.func.jvp`` on the example
inputs. An op without a forward-mode derivative fails here, before training, and is located node
by node; the error lists only the fixes that work for that block, under that method. The CPU
flash-attention kernel has none, but the math kernel does: when that alone is the problem, the
step runs under ``sdpa_kernel(SDPBackend.MATH)``. The fused RNN kernels (oneDNN, cuDNN) have none
either: ``fused_rnn_free`` makes the traced copy's RNNs use torch's native kernels under ``torch.func``
transforms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx
from torch import Tensor, nn
from torch.func import vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._blocks import call, push, push_params, rng_state, state
from ._errors import FwdTransError
from ._method import on_reference
from ._trace import preserved_state

__all__ = ["attention_context", "check_forward_ad", "check_recompute", "fused_rnn_free"]


def attention_context(math_attention: bool):
    """The context a step runs in: the math attention kernel when the flash kernel lacks forward AD."""
    return sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()


# ----------------------------------------------------------------------------- RNNs
@contextlib.contextmanager
def _native_kernels():
    saved = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = saved


class _NativeKernels:
    """Under ``torch.func`` transforms or forward AD, run torch's native (unfused) RNN kernels: the oneDNN
    and cuDNN ones have no forward-mode derivative (and oneDNN's LSTM no ``vjp`` under ``no_grad``).
    Elsewhere the module runs its usual kernels, so ``converted(x)`` still equals ``model(x)`` bitwise."""

    def forward(self, input, hx=None):
        dual = isinstance(input, Tensor) and fwAD.unpack_dual(input).tangent is not None
        if not (dual or torch._C._are_functorch_transforms_active()):
            return super().forward(input, hx)
        with _native_kernels():
            return super().forward(input, hx)


class NativeRNN(_NativeKernels, nn.RNN):
    """``nn.RNN`` with forward AD under ``torch.func`` (see ``fused_rnn_free``)."""


class NativeGRU(_NativeKernels, nn.GRU):
    """``nn.GRU`` with forward AD under ``torch.func`` (see ``fused_rnn_free``)."""


class NativeLSTM(_NativeKernels, nn.LSTM):
    """``nn.LSTM`` with forward AD under ``torch.func`` (see ``fused_rnn_free``)."""


_NATIVE = {nn.RNN: NativeRNN, nn.GRU: NativeGRU, nn.LSTM: NativeLSTM}


def fused_rnn_free(module: nn.Module) -> nn.Module:
    """Make every ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` in ``module`` run torch's native kernels under
    ``torch.func`` transforms, **in place**; returns ``module``. Call it on a copy, never on the user's model.

    The modules keep their parameters, names and options (layers, ``batch_first``, bidirectional,
    projections, dropout): only their class changes, to a subclass whose forward differs in the kernels it
    picks. Subclasses of those modules (which may override ``forward``) are left alone.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.LSTM(4, 8, batch_first=True))
        >>> fused_rnn_free(model)[0]
        NativeLSTM(4, 8, batch_first=True)
        >>> list(model.state_dict())[:2]
        ['0.weight_ih_l0', '0.weight_hh_l0']
    """
    for m in module.modules():
        if type(m) in _NATIVE:
            m.__class__ = _NATIVE[type(m)]
    return module


# ----------------------------------------------------------------------------- the forward-AD check
def _crossing(method, j: int, last: int, block: nn.Module) -> tuple[bool, bool]:
    """What the forward engine pushes through block ``j``: (input tangents, parameter tangents)."""
    return method.crossing(j, last, any(p.requires_grad for p in block.parameters()))


def _probe(block: nn.Module, h: tuple, inputs: bool, params: bool) -> None:
    trained = [p for p in block.parameters() if p.requires_grad]
    if params:  # the engine's own code paths, run once
        push_params(block, h, [(0, torch.randn(1, *p.shape, dtype=p.dtype, device=p.device)) for p in trained], 1)
    if inputs and h[0].is_floating_point():  # integer inputs (token ids) carry no tangent
        push(block, h[0], [torch.randn(1, *h[0].shape, dtype=h[0].dtype, device=h[0].device)])


def _pulls_back(block: nn.Module, h: tuple, j: int) -> bool:
    """Whether ``torch.func.vjp`` differentiates the block, as every method's step does (under ``no_grad``)."""
    trained, frozen, buffers = state(block)
    inputs = h if j > 0 and h[0].is_floating_point() else ()
    try:
        with torch.no_grad():
            out, pull = vjp(lambda p, *x: call(block, {**frozen, **p}, buffers, *(x or h))[0], trained, *inputs)
            pull(torch.randn_like(out))
    except Exception:  # noqa: BLE001 - any failure means no method can train through the block
        return False
    return True


class _Located(Exception):
    def __init__(self, node: fx.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error


def _locate(block: fx.GraphModule, h: tuple) -> tuple[fx.Node, Exception] | None:
    """Run the block node by node on a dual input; return the first node that fails (None if none does)."""
    class Locator(fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception as e:
                raise _Located(n, e) from None

    if not (isinstance(h[0], Tensor) and h[0].is_floating_point()):
        return None
    try:
        with fwAD.dual_level():
            Locator(block).run(fwAD.make_dual(h[0], torch.randn_like(h[0])), *h[1:])
    except _Located as found:
        return found.node, found.error
    return None


def _fixes(method, j: int, blocks: list[fx.GraphModule], h: tuple) -> list[str]:
    """The fixes that work for block ``j``: each is checked against the engine's rules, and against ``vjp``."""
    fixes = []
    if _pulls_back(blocks[j], h, j):
        if method.space != "weight":
            fixes.append("if fwdtrans.inspect lists a cut point after it, make that the first cut (blocks=[that "
                         "name, ...]) so that it falls in block 0, which activity-space tangents never cross")
        for k, v, change in (("target", "local", lambda: dataclasses.replace(method, target="local")),
                             ("engine", "reference", lambda: on_reference(method))):
            try:
                other = change()
            except FwdTransError:  # not a valid method with the others' options
                continue
            if not any(_crossing(other, j, len(blocks) - 1, blocks[j])):
                fixes.append(f"train with {k}={v!r}" + (" (no tangent crosses a block)" if k == "target" else
                                                       " (backprop computes the same estimator)"))
    return [*fixes, "replace it with an equivalent that has forward AD (the docs' 'Converting your model' page "
                    "lists what works)"]


def random_blocks(blocks: list[fx.GraphModule], example_inputs: tuple[Tensor, ...]) -> tuple[bool, ...]:
    """Per block, whether its train-mode forward draws random numbers (dropout, in any form: modules,
    functions, or inside a module kept whole): run on the example inputs, the random state moves."""
    drawn = []
    with contextlib.ExitStack() as stack, torch.no_grad():
        for block in blocks:
            stack.enter_context(preserved_state(block))
        h = tuple(example_inputs)
        for block in blocks:
            with torch.random.fork_rng(devices=[]):
                before = rng_state()
                h = (block(*h),)
                drawn.append(any(not torch.equal(a, b) for a, b in zip(before, rng_state(), strict=True)))
    return tuple(drawn)


def check_forward_ad(blocks: list[fx.GraphModule], example_inputs: tuple[Tensor, ...], method) -> bool:
    """Raise a FwdTransError naming the node if a tangent would cross an op without forward AD.

    Returns whether the step must run with the math attention kernel. Probing prints nothing (a
    ``GraphModule`` that fails prints its generated code to stderr: that is silenced).
    """
    math_attention = False
    with contextlib.ExitStack() as stack:
        for block in blocks:
            stack.enter_context(preserved_state(block))
        h = tuple(example_inputs)
        for j, block in enumerate(blocks):
            inputs, params = _crossing(method, j, len(blocks) - 1, block)
            if inputs or params:
                with contextlib.redirect_stderr(io.StringIO()):
                    try:
                        _probe(block, h, inputs, params)
                    except Exception:  # noqa: BLE001 - any failure is located and reported below
                        try:
                            with attention_context(True):  # the flash attention kernel lacks forward AD
                                _probe(block, h, inputs, params)
                            math_attention = True
                        except Exception as error:  # noqa: BLE001
                            raise _unsupported(method, j, blocks, h, error) from None
            with torch.no_grad():
                h = (block(*h),)
    return math_attention


def _unsupported(method, j: int, blocks: list[fx.GraphModule], h: tuple, error: Exception) -> FwdTransError:
    with attention_context(True):  # the failure that remains with the math attention kernel
        located = _locate(blocks[j], h)
    where = "an operation"
    if located:
        node, error = located
        scope = node.meta.get("nn_module_stack") or {}
        module = node.target if node.op == "call_module" else (next(reversed(scope)) if scope else "")
        where = (f"node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}) in module "
                 f"'{module or 'the top level'}'")
    fixes = _fixes(method, j, blocks, h)
    return FwdTransError(
        f"block {j} contains an operation without a forward-mode derivative in torch {torch.__version__}: "
        f"{where}: {str(error).splitlines()[0]}\n"
        f"A tangent stream must cross it. Fix{'es' if len(fixes) > 1 else ''}: {'; '.join(fixes)}."
    )


def dropout_node(block: fx.GraphModule) -> str | None:
    """The first node of ``block`` that draws a random dropout mask (``"name (target)"``), if any."""
    for n in block.graph.nodes:
        module = block.get_submodule(n.target) if n.op == "call_module" else None
        name = getattr(n.target, "__name__", "")
        if isinstance(module, nn.modules.dropout._DropoutNd) or (n.op == "call_function" and "dropout" in name):
            return f"'{n.name}' ({n.target if module is not None else name})"
    return None


def check_recompute(blocks: list[fx.GraphModule], method) -> None:
    """``recompute=True`` runs a block's forward twice: refuse blocks that draw random numbers."""
    if not method.recompute:
        return
    for j, block in enumerate(blocks[:-1]):
        node = dropout_node(block)
        if node is not None:
            raise FwdTransError(
                f"recompute=True runs block {j}'s forward again for its pull-back, but node {node} draws a random "
                "dropout mask, which the second run would not reproduce. Fix: recompute=False, or remove dropout from "
                "the blocks before the last.")