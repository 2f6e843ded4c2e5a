"""What a study is: a table of runs, rows x columns x seeds, each cell one ``TrainConfig``.

A study lays its runs out the way the paper lays out a results table: each *row* (e.g. "Local,
CNN": a guess and a head) and each *column* (e.g. "C10 A (16b)": a data set, a space, a block
count) sets some fields of :class:`TrainConfig`, flat: the method's fields (``guess = "local"``)
beside the others, as :meth:`TrainConfig.from_dict` takes them; a cell is one run per seed. Fields are merged in
the order ``train`` (shared) < column < row < ``overrides`` (rules such as "random guesses use
lr 0.005", the paper's per-configuration learning rates), so that each row and column says only
what distinguishes it. ``engine="auto"`` picks, per cell, the engine the Performance page
measures faster (both compute the same estimates). A row may carry the paper's number per
column, printed beside ours.

Studies come from presets (``_presets``) or from a TOML file (:func:`load_spec`)::

    name = "my-study"
    title = "Global target, CIFAR-10, 8 blocks"
    seeds = [0, 1]

    [train]                 # TrainConfig fields shared by every run
    epochs = 8
    width = 16

    [[columns]]
    label = "8b A"
    space = "activity"

    [[columns]]
    label = "8b W"
    space = "weight"

    [[rows]]
    label = "Local, CNN"
    guess = "local"
    heads = "cnn"
    paper = { "8b A" = "90.4 ± 0.2", "8b W" = "92.0 ± 0.3" }

    [[rows]]
    label = "Gaussian"
    guess = "gaussian"

    [[overrides]]           # every matching rule applies, in order
    match = { guess = ["gaussian", "rademacher"] }
    set = { lr = 0.005 }
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import FwdTransError
from .._method import HEAD_GUESSES
from ._config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Cell", "Column", "Override", "Row", "StudySpec", "cells", "load_spec", "uses_heads"]

_DEFAULTS = TrainConfig().to_dict()  # the flat fields, the method's among them, with their defaults
_STUDY_ONLY = {"engine": "auto"}  # values a study accepts beyond TrainConfig's
# the fields a study's train, rows, columns and overrides may set (data_dir, device and threads come
# from the command line), with their accepted types
_COMMAND_LINE = ("data_dir", "device", "threads")
_TYPES = {name: (float, int) if isinstance(default, float) else (type(default),)
          for name, default in _DEFAULTS.items()
          if name not in (*_COMMAND_LINE, "tensorboard") and default is not None}
_TYPES.update(head_width=(int,), step_size=(int,), gamma=(float, int))


@dataclass(frozen=True)
class Row:
    """A row of the table: a label, the fields it sets, the paper's numbers by column label, and
    the columns it runs in (``None``: all; e.g. local learning, the same in every space)."""

    label: str
    settings: Mapping[str, Any]
    paper: Mapping[str, str] = field(default_factory=dict)
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Column:
    """A column of the table: a label, the fields it sets, and its seeds (``None``: the study's)."""

    label: str
    settings: Mapping[str, Any]
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Override:
    """Set ``values`` in every cell whose fields equal ``match`` (a value, or a tuple of accepted values)."""

    match: Mapping[str, Any]
    values: Mapping[str, Any]

    def applies(self, settings: Mapping[str, Any]) -> bool:
        return all(settings.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in self.match.items())


@dataclass(frozen=True)
class StudySpec:
    """A whole study. ``notes`` are printed under its table (the paper's setting, deviations)."""

    name: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    seeds: tuple[int, ...] = (0,)
    train: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        _check_fields(self.train, "train")
        for kind, items in (("rows", self.rows), ("columns", self.columns)):
            labels = [item.label for item in items]
            duplicated = sorted({label for label in labels if labels.count(label) > 1})
            if duplicated:
                raise FwdTransError(f"{kind}: the label(s) {duplicated} appear twice; give every {kind[:-1]} its own "
                                    "label.")
            for item in items:
                _check_fields(item.settings, f"{kind}[{item.label!r}]")
        columns = {c.label for c in self.columns}
        for row in self.rows:
            unknown = sorted(set(row.columns or ()) - columns) + sorted(set(row.paper) - columns)
            if unknown:
                raise FwdTransError(f"rows[{row.label!r}] names the column(s) {unknown}, which the study does not "
                                    f"have. Fix: use labels among {sorted(columns)}.")
        for i, rule in enumerate(self.overrides):
            _check_fields(rule.match, f"overrides[{i}].match", values=False)
            _check_fields(rule.values, f"overrides[{i}].set")
        if not self.seeds or not self.rows or not self.columns:
            raise FwdTransError(f"study {self.name!r} needs at least one row, one column and one seed.")

    @property
    def slug(self) -> str:
        return _slug(self.name)


@dataclass(frozen=True)
class Cell:
    """One run of a study: its row, column and seed, its config, and its folder name under the study."""

    row: Row
    column: Column
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{_slug(self.row.label)}__{_slug(self.column.label)}__seed{self.seed}"


def uses_heads(settings: Mapping[str, Any]) -> bool:
    """Whether a run's result depends on its heads: they give its guess or its target."""
    guess, target = settings.get("guess", "local"), settings.get("target", "global")
    return guess in HEAD_GUESSES or target in ("local", "intermediate")


def auto_engine(settings: Mapping[str, Any]) -> str:
    """The engine the Performance page measures faster for a method: the reference engine (two
    backprop passes, as the paper's code) for weight space per tensor, block or sample and for the span
    (the forward engine needs one tangent stream per tensor, or per sample; per sample and tensor for
    ``granularity="sample"``), the forward engine otherwise (the reference engine needs one backward per
    sample for ``per_sample="by-loss"``)."""
    space, granularity = settings.get("space", "activity"), settings.get("granularity", "tensor")
    guess, target = settings.get("guess", "local"), settings.get("target", "global")
    if guess == "global" or (target, guess) == ("local", "local"):  # backprop, local learning: no engine to pick
        return "forward"
    if settings.get("streams") == "sequential" or settings.get("recompute"):  # the forward engine's own options
        return "forward"
    if (space == "weight" and granularity != "joint") or space == "span":
        return "reference"
    if space == "activity" and settings.get("per_sample") == "exact":
        return "reference"
    return "forward"


def cells(spec: StudySpec, **fixed: Any) -> list[Cell]:
    """Every run of ``spec``, rows first, then columns, then seeds. ``fixed`` sets fields for all
    runs (e.g. ``data_dir``, ``device``, ``threads``), after the study's own.

    Raises:
        FwdTransError: A cell's merged fields make an invalid config; the message names the cell.
    """
    out = []
    for row in spec.rows:
        for column in spec.columns:
            if row.columns is not None and column.label not in row.columns:
                continue
            settings = {**spec.train, **column.settings, **row.settings}
            for rule in spec.overrides:
                if rule.applies({**_defaults(), **settings}):
                    settings.update(rule.values)
            if settings.get("engine", "auto") == "auto":
                settings["engine"] = auto_engine(settings)
            for seed in column.seeds or spec.seeds:
                try:
                    config = TrainConfig.from_dict({**settings, **fixed, "seed": seed}).validate()
                except (FwdTransError, TypeError) as e:
                    raise FwdTransError(f"study {spec.name!r}, row {row.label!r}, column {column.label!r}: {e}") \
                        from None
                out.append(Cell(row, column, seed, config))
    names = [c.name for c in out]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise FwdTransError(f"study {spec.name!r}: two runs would share the folder(s) {clashes[:3]}. Fix: give rows "
                            "and columns labels that differ in their letters and digits.")
    return out


def load_spec(path: str | Path) -> StudySpec:
    """Read a study from a TOML file (see the module docstring), refusing unknown keys and bad
    values with the key named.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.toml"
        >>> _ = path.write_text('name = "s"\\n[[rows]]\\nlabel = "BP"\\nguess = "global"\\n'
        ...                     '[[columns]]\\nlabel = "A"\\nspace = "activity"\\n')
        >>> [c.name for c in cells(load_spec(path))]
        ['bp__a__seed0']
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise FwdTransError(f"study file {path} cannot be read ({e.strerror or e}).") from None
    except tomllib.TOMLDecodeError as e:
        raise FwdTransError(f"study file {path} is not valid TOML: {e}.") from None
    where = str(path)
    _known(data, {"name", "title", "notes", "seeds", "train", "rows", "columns", "overrides"}, where)
    for key in ("rows", "columns"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise FwdTransError(f"{where}: '{key}' must be a non-empty list of tables ([[{key}]]).")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise FwdTransError(f"{where}: 'seeds' must be a non-empty list of non-negative integers, got {seeds!r}.")
    rows = tuple(_row(r, f"{where}: rows[{i}]") for i, r in enumerate(data["rows"]))
    columns = tuple(_column(c, f"{where}: columns[{i}]") for i, c in enumerate(data["columns"]))
    overrides = []
    for i, rule in enumerate(data.get("overrides", [])):
        _known(rule, {"match", "set"}, f"{where}: overrides[{i}]")
        match = {k: tuple(v) if isinstance(v, list) else v for k, v in rule.get("match", {}).items()}
        overrides.append(Override(match, rule.get("set", {})))
    return StudySpec(name=str(data.get("name", path.stem)), title=str(data.get("title", path.stem)), rows=rows,
                     columns=columns, seeds=tuple(seeds), train=data.get("train", {}), overrides=tuple(overrides),
                     notes=str(data.get("notes", "")))


def _row(data: dict, where: str) -> Row:
    if not isinstance(data.get("label"), str):
        raise FwdTransError(f"{where}: every row needs a 'label' (a string).")
    paper = data.get("paper", {})
    if not isinstance(paper, dict):
        raise FwdTransError(f"{where}: 'paper' must be a table from column labels to the paper's numbers.")
    columns = data.get("columns")
    settings = {k: v for k, v in data.items() if k not in ("label", "paper", "columns")}
    return Row(data["label"], settings, {k: str(v) for k, v in paper.items()},
               tuple(columns) if columns is not None else None)


def _column(data: dict, where: str) -> Column:
    if not isinstance(data.get("label"), str):
        raise FwdTransError(f"{where}: every column needs a 'label' (a string).")
    seeds = data.get("seeds")
    settings = {k: v for k, v in data.items() if k not in ("label", "seeds")}
    return Column(data["label"], settings, tuple(seeds) if seeds is not None else None)


def _known(data: Any, keys: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise FwdTransError(f"{where} must be a table.")
    unknown = sorted(set(data) - keys)
    if unknown:
        raise FwdTransError(f"{where}: unknown key(s) {unknown}. Fix: use keys among {sorted(keys)}.")


def _defaults() -> dict[str, Any]:
    return dict(_DEFAULTS)


def _check_fields(settings: Mapping[str, Any], where: str, values: bool = True) -> None:
    """Refuse a key that is not a TrainConfig field a study may set, or a value of the wrong type
    (``values=False``: a match, whose values may be tuples of accepted values)."""
    for key, value in settings.items():
        if key in _COMMAND_LINE:
            raise FwdTransError(f"{where}: {key} is set with --{key.replace('_', '-')} on the command line, not in a "
                                f"study. Fix: remove it and run fwdtrans study ... --{key.replace('_', '-')} "
                                f"{key.upper()}.")
        if key not in _TYPES:
            raise FwdTransError(f"{where}: unknown key {key!r}. Fix: use TrainConfig fields among {sorted(_TYPES)}.")
        for v in value if (not values and isinstance(value, tuple)) else (value,):
            if _STUDY_ONLY.get(key) == v:
                continue
            ok = _DEFAULTS[key] is None if v is None else (
                _TYPES[key] == (bool,) if isinstance(v, bool) else isinstance(v, _TYPES[key]))
            if not ok:
                expected = " or ".join(t.__name__ for t in _TYPES[key])
                raise FwdTransError(f"{where}: {key}={v!r} has the wrong type; expected {expected}.")


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "x"
