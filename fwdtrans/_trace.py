"""Trace a model with ``torch.fx`` and record, per node, the module it belongs to, its output
shape and its forward FLOPs.

This is the first stage of :func:`fwdtrans.convert`: everything later (cut finding, heads, blocks)
reads the :class:`Traced` graph produced here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
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


def _einops() -> tuple[tuple[type, ...], tuple[Callable, ...], object]:
    """einops layers (kept whole) and functions (recorded as single calls): they do not trace."""
    try:
        import einops
        from einops.layers import torch as layers
    except ImportError:  # einops is optional for models that do not use it
        return (), (), None
    kinds = tuple(getattr(layers, n) for n in ("Rearrange", "Reduce", "Repeat", "EinMix") if hasattr(layers, n))
    functions = tuple(getattr(einops, n) for n in ("rearrange", "reduce", "repeat", "einsum") if hasattr(einops, n))
    return kinds, functions, einops


def _recorded(fn: Callable) -> Callable:
    """``fn`` that, given fx proxies, records one ``call_function`` node instead of running."""

    @functools.wraps(fn)
    def shim(*args, **kwargs):
        proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return shim


@contextlib.contextmanager
def _module_functions_recorded(module, functions: tuple[Callable, ...]) -> Iterator[None]:
    """Make ``module.fn(...)`` calls (not only imported names) traceable for the duration."""
    if module is None:
        yield
        return
    originals = {fn.__name__: fn for fn in functions}
    for name, fn in originals.items():
        setattr(module, name, _recorded(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


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
    concrete_args: dict | None = None,
) -> Traced:
    """Deep-copy ``model``, trace the copy with ``torch.fx`` and profile every node once.

    The user's model is never touched: tracing and profiling run on the copy, and the copy's
    buffers are restored after the profiling run. The model is traced in train and in eval mode;
    if the two graphs differ (Python branches on ``self.training``) tracing is refused, naming
    the module, since one graph could not serve both modes.
    """
    root = copy.deepcopy(model)
    einops_layers, einops_functions, einops_module = _einops()
    leaves = (*tuple(leaf_modules), *einops_layers)
    wrapped = (*tuple(autowrap_functions), *einops_functions)
    graphs = {}
    for mode in (True, False):
        root.train(mode)
        graphs[mode] = _trace_once(root, leaves, wrapped, einops_module, einops_functions, concrete_args, model)
    root.train(model.training)
    _check_modes_agree(graphs[True], graphs[False], model)
    gm = fx.GraphModule(root, graphs[model.training])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    info, out_shape = _profile(gm, example_inputs)
    return Traced(root, gm.graph, info, out_shape)


def _trace_once(root, leaves, wrapped, einops_module, einops_functions, concrete_args, model) -> fx.Graph:
    tracer = _Tracer(leaves, wrapped)
    stack: list[str] = []
    original_call_module = tracer.call_module

    def call_module(m, forward, args, kwargs):  # remember where tracing was when it failed
        stack.append(tracer.path_of_module(m))
        out = original_call_module(m, forward, args, kwargs)
        stack.pop()
        return out

    tracer.call_module = call_module
    try:
        with _module_functions_recorded(einops_module, einops_functions):
            return tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ... depending on the code
        where = stack[-1] if stack else "the top-level module"
        kind = type(root.get_submodule(stack[-1])).__name__ if stack else type(model).__name__
        raise FwdTransError(
            f"torch.fx cannot trace {type(model).__name__}: in module '{where}' ({kind}), "
            f"{_user_frame(e.__traceback__)}: {type(e).__name__}: {e}\n"
            f"Fixes: keep that module whole with convert(..., leaf_modules=[{kind}]) (it then runs as one "
            "call, so a cut cannot fall inside it); record a free function as one call with "
            "autowrap_functions=[fn]; fix an argument that steers Python control flow with concrete_args={...}; "
            "or move data-dependent control flow out of forward()."
        ) from None


def _check_modes_agree(train: fx.Graph, eval_: fx.Graph, model: nn.Module) -> None:
    def signature(g):
        return [(n.op, str(n.target), n.meta.get("nn_module_stack") and next(reversed(n.meta["nn_module_stack"])))
                for n in g.nodes]

    a, b = signature(train), signature(eval_)
    if a == b:
        return
    first = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    scope = (a[first] if first < len(a) else b[first])[2] or "the top-level module"
    raise FwdTransError(
        f"{type(model).__name__} computes different graphs in train and eval mode (a Python branch on "
        f"self.training, first seen in module '{scope}'), and one traced graph cannot serve both. "
        "Fix: keep that module whole with convert(..., leaf_modules=[TheClass]), or make the branch a tensor "
        "operation (e.g. nn.Dropout instead of `if self.training:`)."
    )


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
