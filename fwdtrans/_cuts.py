"""Find where a traced graph can be cut, choose the cuts, and split the graph into blocks.

A *cut point* is a position in the node order where exactly one tensor is live (computed before,
used after) and that tensor has the batch as its first dimension. Cutting there gives a chain of
blocks that each take one tensor and return one tensor, so a cut never falls inside a residual
block.

With ``multi_tensor=True`` a point may also be crossed by several batch-first tensors (e.g. inside a
residual block: the branch and the skip). The block before such a cut returns them packed into one
``(N, D)`` tensor (:func:`pack`) and the block after unpacks them, so every block still maps one
tensor to one tensor; the engine gives each crossing tensor its own head, guess and tangent.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._errors import FwdTransError
from ._trace import Traced

__all__ = ["CutPoint", "ModalBlock", "block_costs", "choose_cuts", "find_cut_points", "pack", "split", "unpack"]


@dataclass(frozen=True)
class CutPoint:
    """A place where the model can be cut: after node ``node``; the tensors of ``crossing`` cross it."""

    name: str  # the deepest module (not a single layer) that ends here, else the layer or node name
    aliases: tuple[str, ...]  # every name that designates this point
    node: fx.Node
    shape: tuple[int, ...]  # of the block output: the crossing tensor, or (N, D) when several are packed
    flops: int  # forward FLOPs since the previous cut point
    params: int  # parameters first used since the previous cut point
    memory: int  # activation elements produced since the previous cut point
    crossing: tuple[fx.Node, ...] = ()  # the live tensors, in the order they were computed
    shapes: tuple[tuple[int, ...], ...] = ()  # their per-sample shapes


def pack(*tensors: Tensor) -> Tensor:
    """Several batch-first tensors as one ``(N, D)`` tensor (each flattened per sample)."""
    return torch.cat([t.flatten(1) for t in tensors], 1)


def unpack(x: Tensor, shapes: tuple[tuple[int, ...], ...]) -> tuple[Tensor, ...]:
    """The inverse of :func:`pack` for per-sample ``shapes``."""
    parts = x.split([math.prod(s) for s in shapes], 1)
    return tuple(t.reshape(-1, *s) for t, s in zip(parts, shapes, strict=True))


def _nodes(traced: Traced) -> list[fx.Node]:
    return [n for n in traced.graph.nodes if n.op != "output"]


def find_cut_points(traced: Traced, multi_tensor: bool = False) -> list[CutPoint]:
    """Every valid cut point in node order (the model's output itself is not one); with
    ``multi_tensor`` also the points that several batch-first tensors cross."""
    nodes = _nodes(traced)
    position = {n: i for i, n in enumerate(nodes)}
    batch = traced.batch

    # last node of every module scope, so a point can be named after the modules that end there
    scope_end: dict[str, int] = {}
    for i, n in enumerate(nodes):
        scope = traced.info[n].scope
        parts = scope.split(".") if scope else []
        for k in range(1, len(parts) + 1):
            scope_end[".".join(parts[:k])] = i

    points: list[CutPoint] = []
    flops = params = memory = 0
    for i, (n, live) in enumerate(_live_sets(nodes)):
        flops += traced.info[n].flops
        params += traced.info[n].params
        memory += math.prod(traced.info[n].shape) if traced.info[n].shape and n.op != "get_attr" else 0
        crossing = sorted(live, key=position.get)
        shapes = [traced.info[v].shape for v in crossing]
        if n not in live or (len(live) > 1 and not multi_tensor):
            continue
        if any(v.op == "placeholder" or not s or s[0] != batch for v, s in zip(crossing, shapes, strict=True)):
            continue
        if any(_in_place(u, traced) for v in crossing for u in v.users):  # the next block would overwrite it
            continue
        shape = shapes[0] if len(crossing) == 1 else (batch, sum(math.prod(s[1:]) for s in shapes))
        # name the point after the deepest module that ends here, not counting the leaf layer itself
        modules = sorted((s for s, end in scope_end.items() if end == i), key=lambda s: -s.count("."))
        containers = [s for s in modules if not (n.op == "call_module" and s == traced.info[n].scope)]
        scope = traced.info[n].scope
        node_name = f"{scope}.{n.name}" if scope and n.op != "call_module" else n.name
        name = (containers or modules or [node_name])[0]
        aliases = (name, *dict.fromkeys(a for a in (*modules, node_name, n.name) if a != name))
        points.append(CutPoint(name, aliases, n, shape, flops, params, memory, tuple(crossing),
                               tuple(tuple(s[1:]) for s in shapes)))
        flops = params = memory = 0
    return points


def _live_sets(nodes: list[fx.Node]) -> Iterator[tuple[fx.Node, set[fx.Node]]]:
    """Per node but the last, the tensors live after it: computed at or before it, used after it."""
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position.get(u, len(nodes)) for u in n.users), default=-1) for n in nodes}
    live: set[fx.Node] = set()
    for i, n in enumerate(nodes[:-1]):
        if n.op != "get_attr" and last_use[n] > i:
            live.add(n)
        live = {v for v in live if last_use[v] > i}
        yield n, live


def _blocker(traced: Traced, start: int, end: int) -> str | None:
    """The tensor that keeps the graph from being cut between node positions ``start`` and ``end``: of the
    points where several tensors are live, the one live at most of them (a graph input, or a mask or position
    tensor computed once and read by every layer), described for a message."""
    counts: dict[fx.Node, int] = {}
    for i, (_, live) in enumerate(_live_sets(_nodes(traced))):
        if start <= i < end and len(live) > 1:
            for v in live:
                counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None
    v = max(counts, key=lambda v: (counts[v], -len(v.users)))
    if v.op == "placeholder":
        return f"the input '{v.target}'"
    scope = traced.info[v].scope
    return f"the tensor of node '{v.name}'{f' (in module {scope!r})' if scope else ''}"


def _in_place(node: fx.Node, traced: Traced) -> bool:
    """Whether ``node`` may write into its input (``ReLU(inplace=True)``, ``x.add_(...)``,
    ``F.relu(x, inplace=True)``)."""
    if node.op == "call_module":
        return bool(getattr(traced.root.get_submodule(node.target), "inplace", False))
    name = getattr(node.target, "__name__", str(node.target))
    return node.kwargs.get("inplace", False) is True or (name.endswith("_") and not name.endswith("__"))


def _balanced(costs: list[float], tail: float, count: int) -> list[int]:
    """Indices of ``count`` cut points minimising the sum of squared block costs.

    ``costs[i]`` is the cost between point i-1 and point i; ``tail`` the cost after the last point.
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    total = prefix[-1] + tail
    inf = float("inf")
    # best[k][i]: minimal cost of the blocks before point i, with k cuts, the last one at i
    best = [[inf] * n for _ in range(count + 1)]
    back = [[-1] * n for _ in range(count + 1)]
    for i in range(n):
        best[1][i] = prefix[i + 1] ** 2
    for k in range(2, count + 1):
        for i in range(n):
            for j in range(i):
                c = best[k - 1][j] + (prefix[i + 1] - prefix[j + 1]) ** 2
                if c <= best[k][i]:  # ties go to the later cut (after the activation, not before)
                    best[k][i], back[k][i] = c, j
    last = min(reversed(range(n)), key=lambda i: best[count][i] + (total - prefix[i + 1]) ** 2)
    chosen = [last]
    for k in range(count, 1, -1):
        chosen.append(back[k][chosen[-1]])
    return sorted(chosen)


def _totals(traced: Traced) -> dict[str, int]:
    return {
        "flops": sum(i.flops for i in traced.info.values()),
        "params": sum(i.params for i in traced.info.values()),
        "memory": sum(math.prod(i.shape) for n, i in traced.info.items() if i.shape and n.op != "get_attr"),
    }


def block_costs(traced: Traced, cuts: list[CutPoint]) -> list[dict[str, int]]:
    """Forward FLOPs, parameters and activation elements of each block the cuts make."""
    points = find_cut_points(traced, multi_tensor=any(len(c.crossing) > 1 for c in cuts))
    chosen = {c.node for c in cuts}
    costs, current = [], dict.fromkeys(("flops", "params", "memory"), 0)
    for p in points:
        for key in current:
            current[key] += getattr(p, key)
        if p.node in chosen:
            costs.append(current)
            current = dict.fromkeys(current, 0)
    totals = _totals(traced)
    costs.append({k: totals[k] - sum(c[k] for c in costs) for k in totals})
    return costs


def choose_cuts(traced: Traced, blocks: int | list[str], balance: str = "flops",
                multi_tensor: bool = False) -> list[CutPoint]:
    """The cut points for ``blocks``: a block count of at least 2 (balancing ``balance``: forward
    ``"flops"``, ``"params"`` or activation ``"memory"``) or a non-empty list of names to cut after."""
    points = find_cut_points(traced, multi_tensor)
    model = type(traced.root).__name__
    if balance not in ("flops", "params", "memory"):
        raise FwdTransError(f"balance={balance!r}: use 'flops', 'params' or 'memory'.")
    if isinstance(blocks, bool) or not isinstance(blocks, (numbers.Integral, list, tuple)):
        raise FwdTransError(
            f"blocks={blocks!r} is neither a block count nor a list of cut names. Fix: pass an int of at least 2 "
            f"(e.g. blocks=4) or a list of names from fwdtrans.inspect(model, example_inputs)"
            f"{f', e.g. blocks=[{blocks!r}]' if isinstance(blocks, str) else ''}."
        )
    if isinstance(blocks, numbers.Integral):
        blocks = int(blocks)
    if (blocks < 2) if isinstance(blocks, int) else not blocks:
        raise FwdTransError(
            f"blocks={blocks!r}: fwdtrans needs at least 2 blocks; one block has no cut, so nothing would be "
            "trained with forward gradients (it is plain backprop). Fix: ask for blocks=2 or more, or name at least "
            f"one cut ({', '.join(p.name for p in points[:3]) or 'none'}{', ...' if len(points) > 3 else ''}; "
            "see fwdtrans.inspect(model, example_inputs))."
        )
    if isinstance(blocks, int):
        crosses = "batch-first tensors cross" if multi_tensor else "exactly one tensor crosses"
        if not points:
            blocker = _blocker(traced, 0, len(_nodes(traced)))
            raise FwdTransError(
                f"{model} cannot be cut: it has no place where {crosses}"
                f"{f' ({blocker} is live at every point where several are)' if blocker else ''}. Fix: "
                + ("" if multi_tensor else "allow cuts that several tensors cross (multi_tensor=True); ")
                + "pass the inputs that the model reads everywhere in example_inputs, or fix them with concrete_args; "
                "see fwdtrans.inspect(model, example_inputs)."
            )
        if blocks - 1 > len(points):
            raise FwdTransError(
                f"blocks={blocks} needs {blocks - 1} cut points, but {model} has only {len(points)} places where "
                f"{'batch-first tensors cross' if multi_tensor else 'exactly one tensor crosses'} "
                f"({', '.join(p.name for p in points) or 'none'}). Fix: ask for at most blocks={len(points) + 1}"
                f"{'' if multi_tensor else ', or allow cuts that several tensors cross (multi_tensor=True)'}; "
                "see fwdtrans.inspect(model, example_inputs)."
            )
        costs = [float(getattr(p, balance)) for p in points]
        tail = _totals(traced)[balance] - sum(costs)
        chosen = [points[i] for i in _balanced(costs, float(tail), blocks - 1)]
        _warn_if_unbalanced(traced, chosen, balance)
        return chosen
    by_alias = {a: p for p in points for a in p.aliases}
    chosen = []
    for name in blocks:
        if name not in by_alias:
            crosses = "no batch-first tensor crosses" if multi_tensor else "no single tensor crosses"
            raise FwdTransError(
                f"blocks: cannot cut {model} after '{name}': {crosses} "
                f"there, or no module of that name ends a segment. Valid cut names: "
                f"{', '.join(p.name for p in points)}. Fix: pick names from fwdtrans.inspect(model, example_inputs)"
                f"{'' if multi_tensor else ', or allow cuts that several tensors cross (multi_tensor=True)'}."
            )
        chosen.append(by_alias[name])
    order = {p.node: i for i, p in enumerate(points)}
    if len(set(chosen)) != len(chosen) or [order[p.node] for p in chosen] != sorted(order[p.node] for p in chosen):
        raise FwdTransError(f"blocks={blocks}: name each cut once, in the order the model computes them.")
    return chosen


def _warn_if_unbalanced(traced: Traced, cuts: list[CutPoint], balance: str) -> None:
    """Warn when one block holds more than twice its share of ``balance`` (over 75% of it for two blocks),
    naming the tensor that keeps the graph from being cut inside it; not when one operation alone holds that much,
    which no cut could split."""
    costs = [c[balance] for c in block_costs(traced, cuts)]
    total, count = sum(costs), len(costs)
    j = max(range(count), key=costs.__getitem__)
    if not total or costs[j] <= total * min(2 / count, 0.75):
        return
    nodes = _nodes(traced)
    ends = [nodes.index(c.node) for c in cuts]
    start, end = ([-1, *ends][j] + 1, [*ends, len(nodes)][j])
    if balance != "memory" and max(getattr(traced.info[n], balance) for n in nodes[start:end + 1]) > total * min(
            2 / count, 0.75):
        return  # one operation alone (a large stem convolution) is over the share: no cut could help
    blocker = _blocker(traced, start, end)
    warnings.warn(
        f"the blocks of {type(traced.root).__name__} are unbalanced: block {j} holds {costs[j] / total:.0%} of the "
        f"{balance} (an even share: {1 / count:.0%}), for want of cut points inside it"
        + (f": {blocker} is live across it, so that no single tensor crosses there" if blocker else "")
        + ". Fix: pass such inputs in example_inputs or fix them with concrete_args, allow cuts that several tensors "
        "cross (multi_tensor=True), or name the cuts (blocks=[...], see fwdtrans.inspect(model, example_inputs)).",
        UserWarning, stacklevel=3,
    )


def split(traced: Traced, cuts: list[CutPoint]) -> list[fx.GraphModule]:
    """One ``GraphModule`` per block; block j maps the tensor at cut j-1 to the tensor at cut j
    (several crossing tensors travel packed).

    Blocks share submodules (and so parameters) with ``traced.root``; parameters used through
    ``get_attr`` nodes are copied into every block that reads them. Where a layer's arguments depend on
    the mode (``traced.eval_graph``), each block is a :class:`ModalBlock` holding the slice of either graph.
    """
    nodes = _nodes(traced)
    ends = [nodes.index(c.node) for c in cuts] + [len(nodes) - 1]
    train = _slices(traced.graph, ends, [c.crossing for c in cuts], [c.shapes for c in cuts])
    if traced.eval_graph is None:
        graphs: list[tuple[fx.Graph, ...]] = [(g,) for g in train]
    else:  # the same operations, node for node: the eval graph's cuts are at the same positions
        same = dict(zip(traced.graph.nodes, traced.eval_graph.nodes, strict=True))
        evals = _slices(traced.eval_graph, ends, [tuple(same[n] for n in c.crossing) for c in cuts],
                        [c.shapes for c in cuts])
        graphs = list(zip(train, evals, strict=True))
    modules: list[fx.GraphModule] = []
    for j, pair in enumerate(graphs):
        block = (fx.GraphModule(traced.root, pair[0], class_name=f"Block{j}") if len(pair) == 1
                 else ModalBlock(traced.root, *pair, class_name=f"Block{j}"))
        block.graph.eliminate_dead_code()  # get_attr copies that this block does not read
        block.recompile()
        modules.append(block.train(traced.root.training))
    return modules


def _slices(graph: fx.Graph, ends: list[int], crossing: list[tuple[fx.Node, ...]],
            shapes: list[tuple[tuple[int, ...], ...]]) -> list[fx.Graph]:
    """``graph`` cut after the node positions ``ends`` (the last one: the output), as one graph per block."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    output = next(n for n in graph.nodes if n.op == "output")
    graphs, start = [], 0
    for j, end in enumerate(ends):
        block = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if j > 0:
            x = block.placeholder("x")
            if len(crossing[j - 1]) == 1:
                env[crossing[j - 1][0]] = x
            else:
                parts = block.call_function(unpack, (x, shapes[j - 1]))
                env.update({c: block.call_function(operator.getitem, (parts, i))
                            for i, c in enumerate(crossing[j - 1])})

        def lookup(a: fx.Node, env=env, block=block) -> fx.Node:  # this block's env and graph
            if a not in env:  # a get_attr defined in an earlier block
                env[a] = block.node_copy(a)
            return env[a]

        for n in nodes[start : end + 1]:
            env[n] = block.node_copy(n, lookup)
        if j == len(ends) - 1:
            block.output(fx.map_arg(output.args[0], lookup))
        elif len(crossing[j]) == 1:
            block.output(env[crossing[j][0]])
        else:
            block.output(block.call_function(pack, tuple(env[c] for c in crossing[j])))
        graphs.append(block)
        start = end + 1
    return graphs


class ModalBlock(fx.GraphModule):
    """A block with a graph per mode, for layers whose arguments depend on it (a BatchNorm or dropout
    traced through, ``F.batch_norm(x, ..., training=self.training)``): ``train()`` and ``eval()`` switch
    the graph it runs, as they switch a module's behaviour.

    Examples:
        >>> import torch, fwdtrans
        >>> class Drop(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.nn.functional.dropout(x, 0.5, training=self.training)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), Drop(), torch.nn.Linear(4, 2))
        >>> converted = fwdtrans.convert(model, torch.randn(2, 4), blocks=2)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(converted.eval()(x), model.eval()(x))
        True
    """

    def __init__(self, root: nn.Module, train: fx.Graph, eval_: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, train, class_name)
        self.mode_graphs = {True: train, False: eval_}

    def train(self, mode: bool = True) -> ModalBlock:
        super().train(mode)
        graph = self.mode_graphs[bool(mode)]
        if self.graph is not graph:
            self.graph = graph  # recompiles
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ModalBlock:
        copied = super().__deepcopy__(memo)  # copies the graph it runs; the other one is copied with the same memo
        copied.mode_graphs = copy.deepcopy(self.__dict__["mode_graphs"], memo)
        return copied

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as one plain GraphModule per mode, sharing their modules
        plain = tuple(fx.GraphModule(self, copy.deepcopy(self.mode_graphs[m])) for m in (True, False))
        return _modal_block, (*plain, dict(self.named_buffers()), self.training, self.__class__.__name__)


def _modal_block(train: fx.GraphModule, eval_: fx.GraphModule, buffers: dict[str, Tensor], training: bool,
                 name: str) -> ModalBlock:
    block = ModalBlock(train, train.graph, eval_.graph, name)
    for key, b in buffers.items():  # those the graphs do not read (a counted num_batches_tracked)
        owner, _, attr = key.rpartition(".")
        if not hasattr(block.get_submodule(owner), attr):
            block.get_submodule(owner).register_buffer(attr, b)
    return block.train(training)
