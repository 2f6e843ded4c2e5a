"""Forward-mode AD support, checked at ``convert`` time.

Every block a tangent stream will cross is run once under ``torch.func.jvp`` on the example
inputs. An op without a forward-mode derivative fails here, before training, and is located node
by node. The CPU flash-attention kernel has none, but the math kernel does: when that alone is
the problem, the step runs under ``sdpa_kernel(SDPBackend.MATH)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._errors import FwdTransError
from ._trace import preserved_state

__all__ = ["attention_context", "check_forward_ad"]


def attention_context(math_attention: bool):
    """The context a step runs in: the math attention kernel when the flash kernel lacks forward AD."""
    return sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()


def _crossed(method, j: int, block: nn.Module) -> bool:
    if method.kind != "projected" or method.engine != "forward" or method.target == "local":
        return False
    return j > 0 or (method.space == "weight" and any(True for _ in block.parameters()))


def _probe(block: nn.Module, h: tuple[Tensor, ...], weight: bool) -> None:
    from ._engine import _push_params, push  # the engine's own code paths, run once

    trained = [p for p in block.parameters() if p.requires_grad]
    if weight and trained:
        _push_params(block, h, [torch.randn(1, *p.shape, dtype=p.dtype, device=p.device) for p in trained])
    if h[0].is_floating_point():  # integer inputs (token ids) carry no tangent
        push(block, h[0], torch.randn(1, *h[0].shape, dtype=h[0].dtype, device=h[0].device))


def _locate(block: fx.GraphModule, h: Tensor) -> tuple[fx.Node, Exception]:
    """Run the block node by node on a dual input; return the first node that fails."""
    class Locator(fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception as e:
                raise _Located(n, e) from None

    try:
        with fwAD.dual_level():
            Locator(block).run(fwAD.make_dual(h, torch.randn_like(h)))
    except _Located as found:
        return found.node, found.error
    raise AssertionError("the block failed under jvp but not node by node")


class _Located(Exception):
    def __init__(self, node: fx.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error


def check_forward_ad(blocks: list[fx.GraphModule], example_inputs: tuple[Tensor, ...], method) -> bool:
    """Raise a FwdTransError naming the node if a tangent would cross an op without forward AD.

    Returns whether the step must run with the math attention kernel.
    """
    math_attention = False
    with contextlib.ExitStack() as stack:
        for block in blocks:
            stack.enter_context(preserved_state(block))
        h = example_inputs
        for j, block in enumerate(blocks):
            if _crossed(method, j, block):
                try:
                    _probe(block, h, method.space == "weight")
                except Exception:  # noqa: BLE001 - any failure is located and reported below
                    try:
                        with attention_context(True):  # the flash attention kernel lacks forward AD
                            _probe(block, h, method.space == "weight")
                        math_attention = True
                    except Exception:  # noqa: BLE001
                        node, error = _locate(block, h[0])
                        scope = node.meta.get("nn_module_stack") or {}
                        where = node.target if node.op == "call_module" else (next(reversed(scope)) if scope else "")
                        raise FwdTransError(
                            f"block {j} contains an operation without a forward-mode derivative in torch "
                            f"{torch.__version__}: node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}) "
                            f"in module '{where or 'the top level'}': {str(error).splitlines()[0]}\n"
                            "A tangent stream must cross it. Fixes: cut the model so that it falls in the first block "
                            "(activity-space tangents start after block 0), replace it with an equivalent that has "
                            "forward AD (the docs' 'Converting your model' page lists them), or use engine='reference'."
                        ) from None
            with torch.no_grad():
                h = (block(*h),)
    return math_attention


def check_recompute(blocks: list[fx.GraphModule], method) -> None:
    """``recompute=True`` runs a block's forward twice: refuse blocks that draw random numbers."""
    if not method.recompute:
        return
    for j, block in enumerate(blocks[:-1]):
        for n in block.graph.nodes:
            module = block.get_submodule(n.target) if n.op == "call_module" else None
            name = getattr(n.target, "__name__", "")
            if isinstance(module, nn.modules.dropout._DropoutNd) or (n.op == "call_function" and "dropout" in name):
                raise FwdTransError(
                    f"recompute=True runs block {j}'s forward again for its pull-back, but node '{n.name}' "
                    f"({n.target if module is not None else name}) draws a random dropout mask, which the second run "
                    "would not reproduce. Fix: recompute=False, or remove dropout from the blocks before the last.")
