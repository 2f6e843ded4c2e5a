"""The library's import direction (the docs' Architecture page): each module imports only from its own layer or
the layers below, and no module imports itself back through others, counting the imports under
``TYPE_CHECKING`` and inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fwdtrans"

# bottom to top; a package (a folder) is one room of its layer
LAYERS = [
    {"_errors", "_method"},  # errors and vocabulary
    {"_trace", "_cuts", "heads", "_blocks", "_tangents", "_projection", "_persample", "models"},  # the shared base
    {"_engine"},  # the engine: plan and hooks, sweeps, spaces, guesses
    {"_cost", "_support", "_distributed"},  # convert-time planning and probes, data parallelism
    {"_step"},  # one step of a converted model
    {"_check", "_inspect"},
    {"_converted"},
    {"_convert"},
    {"__init__"},  # the public face
    {"app", "__main__"},  # the application, which the library never imports
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _module(path: Path) -> tuple[str, ...]:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def _modules() -> dict[tuple[str, ...], Path]:
    return {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: dict) -> set[tuple[str, ...]]:
    """The modules of fwdtrans that ``path`` imports, anywhere in it (a name imported from a package that is one
    of its modules counts as that module)."""
    here = path.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "fwdtrans":
                base = ()
            else:
                continue
            module = (*base, *[p for p in (node.module or "").split(".") if p and p != "fwdtrans"])
            for alias in node.names:
                found.add((*module, alias.name) if (*module, alias.name) in known else module)
        elif isinstance(node, ast.Import):
            found.update(tuple(a.name.split(".")[1:]) for a in node.names if a.name.startswith("fwdtrans."))
    return {m for m in found if m and m != _module(path)}


def _graph() -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    known = _modules()
    return {m: _imports(p, known) for m, p in known.items()}


def test_every_room_has_a_layer():
    assert {m[0] for m in _graph()} - set(LAYER) == set()


def test_imports_go_down_only():
    upward = sorted((".".join(a), ".".join(b)) for a, bs in _graph().items() for b in bs if LAYER[b[0]] > LAYER[a[0]])
    assert upward == []


def test_no_cycle():
    edges = _graph()
    state: dict[tuple[str, ...], int] = {}

    def visit(module: tuple[str, ...], path: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges.get(module, ())):
            chain = " -> ".join([*path, ".".join(module), ".".join(other)])
            assert state.get(other) != 1, f"import cycle: {chain}"
            if other not in state:
                visit(other, [*path, ".".join(module)])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_no_module_is_too_long_to_read_in_one_sitting():
    assert {".".join(m): n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 420} == {}
