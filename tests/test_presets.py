"""The study presets: every one builds into valid runs laid out as the paper's table, with its lrs and numbers."""

from __future__ import annotations

import pytest

from fwdtrans._errors import FwdTransError
from fwdtrans.app._presets import PRESETS, preset
from fwdtrans.app._studyspec import cells

# runs per preset: rows x the columns they run in x seeds (CIFAR 4 seeds, ImageNet32 1); the paper tables' spaces
# are A, W and W/sample (3 columns where the paper has A and W)
RUNS = {"smoke": 4, "mini": 8, "paper-table2": (1 + 8 * 3) * 4 + (1 + 8 * 3),
        "paper-table3": (1 + 6 * 3) * 4 + (1 + 6 * 3),
        "paper-table4": (2 * 3 + 4 * 9) * 4, "paper-table5": 12 * 6 * 4, "paper-table6": 3 * 2 * 4,
        "paper-table7": (4 + 8 * 12) * 4, "paper-table8": (3 + 8 * 9) * 4, "paper-table9": 2 * (6 + 2 * 18) * 4,
        "paper-table10": 3 * (3 + 2 * 9) * 4, "paper-table11": 3 * 6 * 4}


def _cell(name, row, column, full=False):
    [cell] = [c for c in cells(preset(name, full)) if (c.row.label, c.column.label, c.seed) == (row, column, 0)]
    return cell.config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_builds_valid_unique_runs(name):
    spec = preset(name)
    runs = cells(spec)
    assert len(runs) == RUNS[name] and len({c.name for c in runs}) == len(runs)
    assert spec.name == name and spec.notes and "\n" not in PRESETS[name].description
    columns = {c.label for c in spec.columns}
    for row in spec.rows:  # the paper's numbers sit in columns the row runs in, as printed
        assert set(row.paper) <= set(row.columns or columns)
        assert all(v.replace(" ± ", "").replace(".", "").isdigit() for v in row.paper.values())
    if name not in ("mini", "smoke"):  # the paper's setting; mini's and smoke's are scaled down
        assert {(c.config.width, c.config.batch_size, c.config.schedule, c.config.momentum, c.config.weight_decay)
                for c in runs} <= {(w, 128, "step", 0.9, 5e-4) for w in (32, 64, 128, 256)}
        assert all(c.config.method.engine in ("forward", "reference") for c in runs)


def test_mini():
    runs = cells(preset("mini"))
    assert {(c.row.label, c.column.label) for c in runs} == {
        ("E2E (backprop)", "8b A"), ("Local learning", "8b A"), ("Local, CNN", "8b A"), ("Local, CNN", "8b A exact"),
        ("Local, CNN", "8b W"), ("NTK, CNN", "8b A"), ("Gaussian", "8b A"), ("Rademacher", "8b A")}
    assert {(c.config.width, c.config.blocks, c.config.epochs, c.config.limit, c.config.batch_size,
             c.config.schedule, c.config.heads, c.seed) for c in runs} == {(16, 8, 8, 5000, 128, "cosine", "cnn", 0)}
    assert {c.row.label for c in runs if c.config.diagnostics_every == 39} == {"Local, CNN", "NTK, CNN"}
    assert _cell("mini", "Local, CNN", "8b A exact").method.per_sample == "exact"
    assert _cell("mini", "Local, CNN", "8b W").method.granularity == "tensor"
    assert _cell("mini", "Gaussian", "8b A").lr == 0.01 and _cell("mini", "NTK, CNN", "8b A").lr == 0.05
    full = cells(preset("mini", full=True))
    extra = {c.row.label for c in full} - {c.row.label for c in runs}
    assert extra == {"Local, MLP", "Local, Linear", "NTK, MLP", "NTK, Linear", "Fixed NTK, CNN", "Fixed NTK, MLP",
                     "Fixed NTK, Linear"}
    assert len(full) == 8 + 2 * 2 + 2 + 3
    assert all(c.config.diagnostics_every == 39 for c in full if c.row.label in extra)


@pytest.mark.parametrize("name, row, column, lr, step_size", [
    ("paper-table2", "Gaussian", "C10 A", 0.01, 30),  # random, activity, global target
    ("paper-table2", "Gaussian", "C10 W", 0.005, 30),
    ("paper-table2", "NTK, MLP", "C10 W", 0.01, 30),  # NTK, 16 blocks
    ("paper-table2", "Local, Linear", "C10 A", 0.005, 30),  # local Linear, 16 blocks, activity
    ("paper-table2", "Local, Linear", "C10 W", 0.05, 30),
    ("paper-table2", "E2E", "C10 A", 0.05, 30),
    ("paper-table2", "E2E", "IN32 A", 0.05, 20),
    ("paper-table2", "Local, CNN", "IN32 A", 0.01, 30),
    ("paper-table2", "Local, MLP", "IN32 W", 0.1, 20),
    ("paper-table2", "NTK, CNN", "IN32 W", 0.01, 30),
    ("paper-table2", "NTK, Linear", "IN32 A", 0.005, 30),
    ("paper-table2", "Rademacher", "IN32 A", 0.001, 30),
    ("paper-table2", "Rademacher", "IN32 W", 0.005, 30),
    ("paper-table3", "NTK, CNN", "C10 A", 0.05, 30),  # NTK, 8 blocks
    ("paper-table3", "Local, Linear", "C10 A", 0.05, 30),
    ("paper-table3", "Local, CNN", "IN32 A", 0.05, 20),
    ("paper-table3", "Local, CNN", "IN32 W", 0.05, 30),
    ("paper-table3", "Local, MLP", "IN32 A", 0.01, 30),
    ("paper-table3", "Local, MLP", "IN32 W", 0.1, 20),
    ("paper-table3", "Local, Linear", "IN32 A", 0.01, 20),
    ("paper-table3", "Local, Linear", "IN32 W", 0.01, 30),
    ("paper-table3", "NTK, CNN", "IN32 W", 0.001, 30),
    ("paper-table3", "NTK, MLP", "IN32 A", 0.001, 30),
    ("paper-table3", "NTK, MLP", "IN32 W", 0.005, 30),
    ("paper-table4", "16b local learning", "Lin A", 0.05, 30),  # local learning: 0.05
    ("paper-table4", "8b Gaussian", "CNN A", 0.005, 30),  # random, local target
    ("paper-table5", "NTK, CNN", "16b A", 0.01, 30),
    ("paper-table7", "NTK, CNN", "F-MNIST 8b A", 0.01, 30),
    ("paper-table7", "NTK, CNN", "F-MNIST 16b W", 0.05, 30),
    ("paper-table7", "NTK, CNN", "C100 16b W", 0.01, 30),
    ("paper-table7", "Gaussian", "C100 8b A", 0.005, 30),
    ("paper-table7", "Local, Linear", "C100 16b A", 0.05, 30),
    ("paper-table8", "NTK, Linear", "k=4 A", 0.01, 30),
    ("paper-table8", "Gaussian", "k=2 A", 0.01, 30),
    ("paper-table11", "MLP", "16b W", 0.01, 30),
])
def test_learning_rates_follow_the_paper(name, row, column, lr, step_size):
    config = _cell(name, row, column)
    assert (config.lr, config.step_size) == (lr, step_size)


def test_per_sample_weight_columns_sit_beside_the_batch_level_ones():
    """Every paper table with weight-space columns has a "W/sample" beside each "W": the official code's default
    weight space, run with the reference engine; the paper's numbers go in the "W" columns only."""
    for name in sorted(PRESETS):
        if name in ("mini", "smoke", "paper-table6"):
            continue
        spec = preset(name)
        labels = [c.label for c in spec.columns]
        weight = [label for label in labels if label.endswith(" W")]
        assert weight and [f"{label}/sample" for label in weight] == [la for la in labels if la.endswith("W/sample")]
        for label in weight:
            assert labels.index(f"{label}/sample") == labels.index(label) + 1
        assert all(not k.endswith("/sample") for row in spec.rows for k in row.paper)
        assert "W/sample" in spec.notes and "printed beside the 'W' columns only" in spec.notes
    config = _cell("paper-table3", "Local, CNN", "C10 W/sample")
    assert (config.method.space, config.method.granularity, config.method.engine) == ("weight", "sample", "reference")
    assert config.lr == _cell("paper-table3", "Local, CNN", "C10 W").lr
    assert _cell("paper-table2", "Rademacher", "IN32 W/sample").lr == 0.005  # A.3's weight-space rule
    assert {r.label: r for r in preset("paper-table4").rows}["8b Gaussian"].paper.keys() == {
        "CNN A", "CNN W", "MLP A", "MLP W", "Lin A", "Lin W"}


def test_layout_and_numbers():
    assert preset("paper-table2").rows[2].paper["C10 W"] == "88.7 ± 1.2"  # Local, MLP
    t5 = {r.label: r for r in preset("paper-table5").rows}
    assert t5["Local, Linear"].paper["16b W"] == "86.9"
    assert t5["Gaussian (MLP tgt)"].settings == {"guess": "gaussian", "heads": "mlp"}
    assert _cell("paper-table5", "Gaussian (MLP tgt)", "8b W").method.target == "intermediate"
    in32 = _cell("paper-table2", "Local, CNN", "IN32 W")
    assert (in32.dataset, in32.epochs, in32.gamma, in32.method.space, in32.method.granularity) == (
        "imagenet32", 70, 0.1, "weight", "tensor")
    assert len([c for c in cells(preset("paper-table2"))
                if c.row.label == "NTK, CNN" and c.column.label == "IN32 A"]) == 1
    e2e = preset("paper-table3").rows[0]
    assert (e2e.label, e2e.columns, e2e.paper) == ("E2E", ("C10 A", "IN32 A"),
                                                   {"C10 A": "94.5 ± 0.2", "IN32 A": "54.6"})
    assert "Gaussian" not in {r.label for r in preset("paper-table3").rows}
    ll = {r.label: r for r in preset("paper-table4").rows}["8b local learning"]
    assert ll.columns == ("CNN A", "MLP A", "Lin A") and ll.paper["MLP A"] == "92.1 ± 0.2"
    assert _cell("paper-table4", "8b local learning", "MLP A").method.kind == "local"
    assert _cell("paper-table6", "Linear", "16b").method.space == "span"
    assert _cell("paper-table7", "Local, MLP", "F-MNIST 8b W").dataset == "fashion-mnist"
    assert {r.label: r for r in preset("paper-table7").rows}["Rademacher"].paper["C100 16b A"] == "8.7 ± 1.1"
    assert _cell("paper-table8", "Local, CNN", "k=0.5 W").width == 32
    t9 = {r.label: r for r in preset("paper-table9").rows}
    assert t9["C100 Gaussian"].paper["8b Lin W"] == "26.3 ± 0.4" and t9["F-MNIST local learning"].paper["8b MLP A"] \
        == "94.4 ± 0.2"
    assert {r.label: r for r in preset("paper-table10").rows}["k=4 Rademacher"].paper["Lin W"] == "44.8 ± 0.5"
    assert _cell("paper-table11", "CNN", "8b A").method.guess == "fixed-ntk"
    assert "Imagenette" in preset("paper-table7").notes and "Imagenette" in preset("paper-table9").notes


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(FwdTransError, match="no preset named 'table2'") as e:
        preset("table2")
    assert all(name in str(e.value) for name in PRESETS)
