"""Trace a model with ``torch.fx`` and record, per node, the module it belongs to, its output
shape and its forward FLOPs.

This is the first stage of :func:`fwdtrans.convert`: everything later (cut finding, heads, blocks)
reads the :class:`Traced` graph produced here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
import re
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
    # where a layer's arguments depend on the mode (``F.batch_norm(x, ..., self.training)``): ``graph`` is the
    # train-mode graph and this the eval-mode one, node for node the same operations (None: one graph serves both)
    eval_graph: fx.Graph | None = None
    # ``num_batches_tracked`` of the BatchNorms traced through (not called as modules), which the graph cannot
    # count: counted by the converted model's train-mode steps instead
    counters: tuple[str, ...] = ()


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
    defaults = _unsupplied_defaults(root, example_inputs, concrete_args)
    einops_layers, einops_functions, einops_module = _einops()
    leaf_types = (*tuple(leaf_modules), *einops_layers)
    wrapped = (*tuple(autowrap_functions), *einops_functions)
    graphs = {}
    saved = {name: b.detach().clone() for name, b in root.named_buffers()}
    with preserved_state(root):  # a forward run while tracing (``self.num_batches_tracked.add_(1)``) is undone
        for mode in (True, False):
            root.train(mode)
            graphs[mode] = _trace_once(root, leaf_types, wrapped, einops_module, einops_functions,
                                       {**(concrete_args or {}), **defaults} or None, model)
        changed = [name for name, b in root.named_buffers() if name not in saved or not torch.equal(b, saved[name])]
    root.train(model.training)
    for g in graphs.values():
        _drop_placeholders(g, defaults)
        g.owning_module = root
        g.eliminate_dead_code()
    modal = _check_modes_agree(graphs[True], graphs[False], root, model)
    counters = _counters(root, changed)
    renamed = _rename_reserved(root, [graphs[True], graphs[False]])
    new_names = {original: new for new, original in renamed.items()}
    counters = tuple(new_names.get(head, head) + dot + rest for head, dot, rest in (c.partition(".") for c in counters))
    gm = fx.GraphModule(root, graphs[True] if modal else graphs[model.training])
    gm.recompile()
    info, out_shape = _profile(gm, example_inputs, renamed)
    return Traced(root, gm.graph, info, out_shape, batch, renamed, graphs[False] if modal else None, counters)


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


def _rename_reserved(root: nn.Module, graphs: list[fx.Graph]) -> dict[str, str]:
    """Rename ``root``'s top-level attributes that ``fx.GraphModule`` reserves (a submodule ``meta``
    clashes with ``GraphModule.meta``), in ``root`` and in the targets of ``graphs``; ``{new: original}``."""
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
        for n in (n for graph in graphs for n in graph.nodes):
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
        found = f"torch.fx cannot trace {type(model).__name__}: in module '{where}' ({kind}), " \
                f"{_user_frame(e.__traceback__)}: {type(e).__name__}: {e}\n"
        if not stack and _takes_varargs(root):
            raise FwdTransError(
                found + f"{kind}.forward takes *args/**kwargs (often a decorator's wrapper), which hides its inputs "
                "from torch.fx. Fix: convert a wrapper whose forward names the inputs and returns the logits, e.g. "
                "class Wrapper(nn.Module) with forward(self, input_ids): return self.model(input_ids).logits "
                "(keeping the top level whole would leave nothing to cut)."
            ) from None
        leaf = (f"keep that module whole with convert(..., leaf_modules=[{kind}]) (it then runs as one call, so a "
                "cut cannot fall inside it); ") if stack else ""
        raise FwdTransError(
            found + f"Fixes: {leaf}record a free function as one call with autowrap_functions=[fn]; fix an argument "
            "that steers Python control flow with concrete_args={...}; or move data-dependent control flow out of "
            "forward()" + ("" if stack else " (keeping the top-level module whole would leave nothing to cut)") + "."
        ) from None


def _takes_varargs(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``*args`` or ``**kwargs``, seen through ``functools.wraps`` too."""
    try:
        parameters = inspect.signature(module.forward, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _signature(graph: fx.Graph, arguments: bool) -> list[tuple]:
    """Per node: operation, target and module; with ``arguments``, also its arguments (nodes by position)."""
    index = {n: i for i, n in enumerate(graph.nodes)}

    def args(n: fx.Node) -> str:
        return repr(fx.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")) if arguments else ""

    return [(n.op, str(n.target), n.meta.get("nn_module_stack") and next(reversed(n.meta["nn_module_stack"])),
             args(n)) for n in graph.nodes]


def _check_modes_agree(train: fx.Graph, eval_: fx.Graph, root: nn.Module, model: nn.Module) -> bool:
    """Refuse graphs whose operations differ between train and eval mode; return whether only arguments
    differ (``F.batch_norm(..., training=self.training)``, ``F.dropout(..., training=self.training)``),
    in which case each block keeps a graph per mode."""
    a, b = _signature(train, False), _signature(eval_, False)
    if a == b:
        return _signature(train, True) != _signature(eval_, True)
    first = next((i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), min(len(a), len(b)))
    scope = (a[first] if first < len(a) else b[first])[2]
    kind = type(root.get_submodule(scope)).__name__ if scope else type(model).__name__
    raise FwdTransError(
        f"{type(model).__name__} computes different operations in train and eval mode (a Python branch on "
        f"self.training, first seen in module '{scope or 'the top-level module'}' ({kind})), and one traced graph "
        "cannot serve both. Fix: "
        + (f"keep that module whole with convert(..., leaf_modules=[{kind}]), or make" if scope else "make")
        + " the branch a tensor operation (e.g. nn.Dropout, or F.dropout(x, p, training=self.training), instead "
        "of `if self.training:`)."
    )


def _counters(root: nn.Module, changed: list[str]) -> tuple[str, ...]:
    """The buffers that tracing changed, which the graph does not carry: the ``num_batches_tracked`` of a
    BatchNorm traced through (its forward counts in Python, ``self.num_batches_tracked.add_(1)``) are
    returned, to be counted by the converted model's steps; any other write is refused."""
    counters = []
    for name in changed:
        owner, _, attr = name.rpartition(".")
        module = root.get_submodule(owner)
        kind = f"'{owner or 'the top-level module'}' ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and attr == "num_batches_tracked":
            if module.momentum is None:
                raise FwdTransError(
                    f"{kind} is a BatchNorm with momentum=None (a cumulative average whose factor "
                    "1/num_batches_tracked its forward computes in Python): a traced graph would keep the factor of "
                    "the first batch forever. Fix: keep it whole with convert(..., "
                    f"leaf_modules=[{type(module).__name__}]), or give it a momentum (e.g. 0.1)."
                )
            counters.append(name)
            continue
        raise FwdTransError(
            f"module {kind} writes its buffer '{attr}' in forward() (e.g. self.{attr} += 1) in Python, which a traced "
            f"graph does not carry: the converted model would never update it. Fix: keep the module whole with "
            f"convert(..., leaf_modules=[{type(module).__name__}]), or move the update out of forward()."
        )
    return tuple(counters)


def _unsupplied_defaults(root: nn.Module, example_inputs: tuple, concrete_args: dict | None) -> dict:
    """Forward's parameters that ``example_inputs`` (and ``concrete_args``) leave out, with their defaults
    (``forward(x, attn_mask=None)``): traced as graph inputs, they would stay live through every block, so
    that no cut could fall between the blocks that read them. They are specialised instead."""
    try:
        parameters = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    given = concrete_args or {}
    return {p.name: p.default for p in parameters[len(example_inputs):]
            if p.kind in positional and p.default is not inspect.Parameter.empty and p.name not in given}


def _drop_placeholders(graph: fx.Graph, specialised: dict) -> None:
    """Remove the inputs of ``specialised`` arguments from ``graph``, with the checks ``torch.fx`` adds on
    them (``torch._assert(x == value)``, ``_assert_is_none(x)``): their value is fixed, and the blocks take no
    such input. (``torch.fx`` names such an input ``attn_mask_1``.)"""
    checks = {operator.eq, torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None)}
    for node in [n for n in graph.nodes if n.op == "placeholder" and re.sub(r"_\d+$", "", n.target) in specialised]:
        found = [node]
        for n in found:  # the checks that read the input, and only those
            found += [u for u in n.users if u.target in checks and u not in found]
        if all(u in found for n in found for u in n.users):
            for n in reversed(found):
                graph.erase_node(n)


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
