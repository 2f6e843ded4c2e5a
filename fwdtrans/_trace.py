"""Trace a model with ``torch.fx`` and record, per node, the module it belongs to, its output
shape and its forward FLOPs.

This is the first stage of :func:`fwdtrans.convert`: everything later (cut finding, heads, blocks)
reads the :class:`Traced` graph produced here.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._errors import FwdTransError

__all__ = ["NodeInfo", "Traced", "trace"]


@dataclass(frozen=True)
class NodeInfo:
    """What one graph node computes on the example inputs."""

    scope: str  # qualified name of the innermost module the node belongs to ("" = top level)
    shape: tuple[int, ...] | None  # output shape when the output is a single tensor, else None
    flops: int  # forward FLOPs of this node (matmul/conv work, as counted by torch)
    params: int  # parameters first used by this node


@dataclass
class Traced:
    """A traced copy of the user's model: the root module, its graph, and per-node facts."""

    root: nn.Module
    graph: fx.Graph
    info: dict[fx.Node, NodeInfo]
    output_shape: tuple[int, ...]


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...], autowrap_functions: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap_functions)
        self._leaf_types = leaf_modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Run code that may update buffers (BatchNorm statistics) and restore them afterwards."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch and fwdtrans, as ``file:line (code)``."""
    frames = [f for f in traceback.extract_tb(tb) if "/torch/" not in f.filename and "/fwdtrans/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"


def trace(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> Traced:
    """Deep-copy ``model``, trace the copy with ``torch.fx`` and profile every node once.

    The user's model is never touched: tracing and profiling run on the copy, and the copy's
    buffers are restored after the profiling run.
    """
    root = copy.deepcopy(model)
    tracer = _Tracer(tuple(leaf_modules), tuple(autowrap_functions))
    stack: list[str] = []
    original_call_module = tracer.call_module

    def call_module(m, forward, args, kwargs):  # remember where tracing was when it failed
        stack.append(tracer.path_of_module(m))
        out = original_call_module(m, forward, args, kwargs)
        stack.pop()
        return out

    tracer.call_module = call_module
    try:
        graph = tracer.trace(root)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ... depending on the code
        where = stack[-1] if stack else "the top-level module"
        raise FwdTransError(
            f"torch.fx cannot trace {type(model).__name__}: in module '{where}' "
            f"({_user_frame(e.__traceback__)}): {type(e).__name__}: {e}\n"
            "Fixes: mark that module as a leaf (convert(..., leaf_modules=[TheClass])) so it is called "
            "as a whole, wrap a free function with autowrap_functions=[fn], or move data-dependent "
            "Python control flow out of forward()."
        ) from None
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    info, out_shape = _profile(gm, example_inputs)
    return Traced(root, gm.graph, info, out_shape)


class _Profiler(fx.Interpreter):
    """Runs the graph once, recording shapes, FLOPs and first-use parameter counts."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.info: dict[fx.Node, NodeInfo] = {}
        self._seen: set[int] = set()

    def _new_params(self, tensors: Iterable[torch.Tensor]) -> int:
        count = 0
        for p in tensors:
            if isinstance(p, nn.Parameter) and id(p) not in self._seen:
                self._seen.add(id(p))
                count += p.numel()
        return count

    def run_node(self, n: fx.Node):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        if n.op == "call_module":
            params = self._new_params(self.module.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            params = self._new_params([out] if isinstance(out, torch.Tensor) else [])
        else:
            params = 0
        stack = n.meta.get("nn_module_stack") or {}
        scope = n.target if n.op == "call_module" else (next(reversed(stack)) if stack else "")
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.info[n] = NodeInfo(str(scope), shape, int(counter.get_total_flops()), params)
        return out


def _profile(gm: fx.GraphModule, example_inputs) -> tuple[dict, tuple[int, ...]]:
    profiler = _Profiler(gm)
    with preserved_state(gm), torch.no_grad():
        try:
            out = profiler.run(*example_inputs)
        except Exception as e:
            raise FwdTransError(
                f"running the traced model on example_inputs failed: {type(e).__name__}: {e}\n"
                "Fix: pass example_inputs as a tuple of tensors that model(*example_inputs) accepts."
            ) from None
    if not isinstance(out, torch.Tensor):
        raise FwdTransError(
            f"the model returns {type(out).__name__}; fwdtrans needs a model that returns one "
            "tensor of logits (N, classes). Fix: wrap the model in a module that returns the logits."
        )
    return profiler.info, tuple(out.shape)
