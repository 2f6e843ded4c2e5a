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
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._errors import FwdTransError

__all__ = ["NodeInfo", "Traced", "leaves", "original_target", "trace"]


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
    batch: int = 0  # the example inputs' batch size
    renamed: dict[str, str] = field(default_factory=dict)  # top-level attributes renamed in root: new -> original


# attributes of fx.GraphModule that a submodule, parameter or buffer of the same name would clash with
_RESERVED = frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph()))) - frozenset(dir(nn.Module()))


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
    the module, since one graph could not serve both modes. ``example_inputs`` are the positional
    arguments of ``forward``: tensors, or dicts, lists and tuples of them (a dict argument is traced as
    one placeholder that the graph indexes). Top-level attributes named like an ``fx.GraphModule``
    attribute (``meta``, ``graph``, ``code``, ...) are renamed in the copy (``Traced.renamed``).
    """
    if not isinstance(model, nn.Module):
        raise FwdTransError(
            f"model is a {type(model).__name__}, not an nn.Module: fwdtrans traces, copies and trains modules. "
            "Fix: wrap it in a module that holds its parameters, e.g. class Model(nn.Module) whose forward(x) "
            "calls it."
        )
    batch = next((t.shape[0] for _, t in leaves(example_inputs) if isinstance(t, torch.Tensor) and t.dim()), None)
    if batch is None:
        raise FwdTransError(f"example_inputs hold no batch-first tensor ({type(example_inputs).__name__}). "
                            "Fix: pass example_inputs as a tuple of what model(*example_inputs) accepts.")
    root = copy.deepcopy(model)
    einops_layers, einops_functions, einops_module = _einops()
    leaf_types = (*tuple(leaf_modules), *einops_layers)
    wrapped = (*tuple(autowrap_functions), *einops_functions)
    graphs = {}
    for mode in (True, False):
        root.train(mode)
        graphs[mode] = _trace_once(root, leaf_types, wrapped, einops_module, einops_functions, concrete_args, model)
    root.train(model.training)
    _check_modes_agree(graphs[True], graphs[False], model)
    renamed = _rename_reserved(root, graphs[model.training])
    gm = fx.GraphModule(root, graphs[model.training])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    info, out_shape = _profile(gm, example_inputs, renamed)
    return Traced(root, gm.graph, info, out_shape, batch, renamed)


def leaves(inputs, path: str = "x") -> Iterator[tuple[str, object]]:
    """``(path, leaf)`` for every leaf of nested tuples, lists and dicts: ``("x[0]['image']", tensor)``."""
    if isinstance(inputs, (tuple, list)):
        for i, v in enumerate(inputs):
            yield from leaves(v, f"{path}[{i}]")
    elif isinstance(inputs, dict):
        for k, v in inputs.items():
            yield from leaves(v, f"{path}[{k!r}]")
    else:
        yield path, inputs


def _rename_reserved(root: nn.Module, graph: fx.Graph) -> dict[str, str]:
    """Rename ``root``'s top-level attributes that ``fx.GraphModule`` reserves (a submodule ``meta``
    clashes with ``GraphModule.meta``), in ``root`` and in the targets of ``graph``; ``{new: original}``."""
    renamed = {}
    for name in sorted(_RESERVED & {*root._modules, *root._parameters, *root._buffers}):
        new = name + "_"
        while hasattr(root, new) or new in _RESERVED:
            new += "_"
        for store in (root._modules, root._parameters, root._buffers):
            if name in store:
                store[new] = store.pop(name)
        if name in root._non_persistent_buffers_set:
            root._non_persistent_buffers_set ^= {name, new}  # the buffer stays out of the state dict
        renamed[new] = name
        for n in graph.nodes:
            if n.op in ("call_module", "get_attr") and (n.target == name or n.target.startswith(name + ".")):
                n.target = new + n.target[len(name):]
    return renamed


def original_target(target: str, renamed: dict[str, str]) -> str:
    """A (possibly renamed) qualified name under the original model's names."""
    head, dot, rest = target.partition(".")
    return renamed.get(head, head) + dot + rest


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
    first = next((i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), min(len(a), len(b)))
    scope = (a[first] if first < len(a) else b[first])[2] or "the top-level module"
    raise FwdTransError(
        f"{type(model).__name__} computes different graphs in train and eval mode (a Python branch on "
        f"self.training, first seen in module '{scope}'), and one traced graph cannot serve both. "
        "Fix: keep that module whole with convert(..., leaf_modules=[TheClass]), or make the branch a tensor "
        "operation (e.g. nn.Dropout instead of `if self.training:`)."
    )


class _Profiler(fx.Interpreter):
    """Runs the graph once, recording shapes, FLOPs and first-use parameter counts."""

    def __init__(self, gm: fx.GraphModule, renamed: dict[str, str]):
        super().__init__(gm)
        self.renamed = renamed
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
        if n.op == "call_module":
            scope = original_target(n.target, self.renamed)
        else:
            scope = next(reversed(stack)) if stack else ""
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.info[n] = NodeInfo(str(scope), shape, int(counter.get_total_flops()), params)
        return out


def _profile(gm: fx.GraphModule, example_inputs, renamed: dict[str, str]) -> tuple[dict, tuple[int, ...]]:
    profiler = _Profiler(gm, renamed)
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
