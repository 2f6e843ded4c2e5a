"""Find where a traced graph can be cut, choose the cuts, and split the graph into blocks.

A *cut point* is a position in the node order where exactly one tensor is live (computed before,
used after) and that tensor has the batch as its first dimension. Cutting there gives a chain of
blocks that each take one tensor and return one tensor, so a cut never falls inside a residual
block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from ._errors import FwdTransError
from ._trace import Traced

__all__ = ["CutPoint", "block_costs", "choose_cuts", "find_cut_points", "split"]


@dataclass(frozen=True)
class CutPoint:
    """A place where the model can be cut: after node ``node``, whose output crosses alone."""

    name: str  # the deepest module (not a single layer) that ends here, else the layer or node name
    aliases: tuple[str, ...]  # every name that designates this point
    node: fx.Node
    shape: tuple[int, ...]
    flops: int  # forward FLOPs since the previous cut point
    params: int  # parameters first used since the previous cut point
    memory: int  # activation elements produced since the previous cut point


def _nodes(traced: Traced) -> list[fx.Node]:
    return [n for n in traced.graph.nodes if n.op != "output"]


def find_cut_points(traced: Traced) -> list[CutPoint]:
    """Every valid cut point in node order (the model's output itself is not one)."""
    nodes = _nodes(traced)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position.get(u, len(nodes)) for u in n.users), default=-1) for n in nodes}
    batch = next(traced.info[n].shape for n in nodes if n.op == "placeholder")[0]

    # last node of every module scope, so a point can be named after the modules that end there
    scope_end: dict[str, int] = {}
    for i, n in enumerate(nodes):
        scope = traced.info[n].scope
        parts = scope.split(".") if scope else []
        for k in range(1, len(parts) + 1):
            scope_end[".".join(parts[:k])] = i

    points: list[CutPoint] = []
    live: set[fx.Node] = set()
    flops = params = memory = 0
    for i, n in enumerate(nodes[:-1]):
        flops += traced.info[n].flops
        params += traced.info[n].params
        memory += math.prod(traced.info[n].shape) if traced.info[n].shape and n.op != "get_attr" else 0
        if n.op != "get_attr" and last_use[n] > i:
            live.add(n)
        live = {v for v in live if last_use[v] > i}
        shape = traced.info[n].shape
        if live != {n} or n.op == "placeholder" or not shape or shape[0] != batch:
            continue
        if any(_in_place(u, traced) for u in n.users):  # the next block would overwrite this block's output
            continue
        # name the point after the deepest module that ends here, not counting the leaf layer itself
        modules = sorted((s for s, end in scope_end.items() if end == i), key=lambda s: -s.count("."))
        containers = [s for s in modules if not (n.op == "call_module" and s == n.target)]
        scope = traced.info[n].scope
        node_name = f"{scope}.{n.name}" if scope and n.op != "call_module" else n.name
        name = (containers or modules or [node_name])[0]
        aliases = (name, *dict.fromkeys(a for a in (*modules, node_name, n.name) if a != name))
        points.append(CutPoint(name, aliases, n, shape, flops, params, memory))
        flops = params = memory = 0
    return points


def _in_place(node: fx.Node, traced: Traced) -> bool:
    """Whether ``node`` may write into its input (``ReLU(inplace=True)``, ``x.add_(...)``, ``F.relu(x, inplace=True)``)."""
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
    points = find_cut_points(traced)
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


def choose_cuts(traced: Traced, blocks: int | list[str], balance: str = "flops") -> list[CutPoint]:
    """The cut points for ``blocks``: a block count (balancing ``balance``: forward ``"flops"``,
    ``"params"`` or activation ``"memory"``) or a list of names to cut after."""
    points = find_cut_points(traced)
    model = type(traced.root).__name__
    if balance not in ("flops", "params", "memory"):
        raise FwdTransError(f"balance={balance!r}: use 'flops', 'params' or 'memory'.")
    if isinstance(blocks, int):
        if blocks < 1:
            raise FwdTransError(f"blocks={blocks}: ask for at least 1 block.")
        if blocks - 1 > len(points):
            raise FwdTransError(
                f"blocks={blocks} needs {blocks - 1} cut points, but {model} has only {len(points)} places where "
                f"exactly one tensor crosses ({', '.join(p.name for p in points) or 'none'}). "
                f"Fix: ask for at most blocks={len(points) + 1}, or see fwdtrans.inspect(model, example_inputs)."
            )
        if blocks == 1:
            return []
        costs = [float(getattr(p, balance)) for p in points]
        tail = _totals(traced)[balance] - sum(costs)
        return [points[i] for i in _balanced(costs, float(tail), blocks - 1)]
    by_alias = {a: p for p in points for a in p.aliases}
    chosen = []
    for name in blocks:
        if name not in by_alias:
            raise FwdTransError(
                f"blocks: cannot cut {model} after '{name}': no single tensor crosses there, or no module of "
                f"that name ends a segment. Valid cut names: {', '.join(p.name for p in points)}. "
                "Fix: pick names from fwdtrans.inspect(model, example_inputs)."
            )
        chosen.append(by_alias[name])
    order = {p.node: i for i, p in enumerate(points)}
    if len(set(chosen)) != len(chosen) or [order[p.node] for p in chosen] != sorted(order[p.node] for p in chosen):
        raise FwdTransError(f"blocks={blocks}: name each cut once, in the order the model computes them.")
    return chosen


def split(traced: Traced, cuts: list[CutPoint]) -> list[fx.GraphModule]:
    """One ``GraphModule`` per block; block j maps the tensor at cut j-1 to the tensor at cut j.

    Blocks share submodules (and so parameters) with ``traced.root``; parameters used through
    ``get_attr`` nodes are copied into every block that reads them.
    """
    nodes = _nodes(traced)
    ends = [nodes.index(c.node) for c in cuts] + [len(nodes) - 1]
    output = next(n for n in traced.graph.nodes if n.op == "output")
    modules, start = [], 0
    for j, end in enumerate(ends):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if j > 0:
            env[cuts[j - 1].node] = graph.placeholder("x")

        def lookup(a: fx.Node) -> fx.Node:
            if a not in env:  # a get_attr defined in an earlier block
                env[a] = graph.node_copy(a)
            return env[a]

        for n in nodes[start : end + 1]:
            env[n] = graph.node_copy(n, lookup)
        graph.output(fx.map_arg(output.args[0], lookup) if j == len(ends) - 1 else env[nodes[end]])
        block = fx.GraphModule(traced.root, graph, class_name=f"Block{j}")
        block.graph.eliminate_dead_code()  # get_attr copies that this block does not read
        block.recompile()
        modules.append(block)
        start = end + 1
    return modules
