"""``fwdtrans study``: TOML validation, resume after a crash, the table in the paper's layout, end to end."""

import csv
import json
import os

import pytest
from crashes import run_until

from fwdtrans._errors import FwdTransError
from fwdtrans.app._cli import main
from fwdtrans.app._report import format_table
from fwdtrans.app._studyspec import Column, Override, Row, StudySpec, auto_engine, cells, load_spec

STUDY = """
name = "tiny"
title = "A tiny study"
seeds = [0]
notes = "For the tests."

[train]
width = 2
blocks = 2
heads = "linear"
limit = 96
batch_size = 32
epochs = 2

[[columns]]
label = "A"
space = "activity"

[[columns]]
label = "W"
space = "weight"

[[rows]]
label = "E2E"
guess = "global"
columns = ["A"]
paper = { A = "94.5 ± 0.2" }

[[rows]]
label = "Local, linear"
guess = "local"
paper = { A = "65.9 ± 6.7", W = "88.9 ± 0.3" }

[[overrides]]
match = { space = "weight" }
set = { lr = 0.01 }
"""


def write(tmp_path, text=STUDY, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_study_cells(tmp_path):
    spec = load_spec(write(tmp_path))
    runs = cells(spec, threads=1)
    assert [c.name for c in runs] == ["e2e__a__seed0", "local-linear__a__seed0", "local-linear__w__seed0"]
    assert [c.config.lr for c in runs] == [0.05, 0.05, 0.01]  # the override, in the weight column only
    assert [c.config.method.engine for c in runs] == ["forward", "forward", "reference"]  # auto: weight -> reference
    assert all(c.config.threads == 1 and c.config.epochs == 2 for c in runs)


@pytest.mark.parametrize("text, words", [
    (STUDY.replace('title = "A tiny study"', 'titel = "x"'), "unknown key(s) ['titel']"),
    (STUDY.replace('width = 2', 'widht = 2'), "unknown key 'widht'"),
    (STUDY.replace('width = 2', 'width = "2"'), "width='2' has the wrong type"),
    (STUDY.replace('epochs = 2', 'epochs = 0'), "epochs=0 is not valid"),
    (STUDY.replace('label = "W"\nspace = "weight"', 'label = "W"\nspace = "weights"'), "space='weights'"),
    (STUDY.replace('match = { space = "weight" }', 'match = { spaces = "weight" }'), "unknown key 'spaces'"),
    (STUDY.replace('columns = ["A"]', 'columns = ["B"]'), "names the column(s) ['B']"),
    (STUDY.replace('seeds = [0]', 'seeds = [-1]'), "'seeds' must be"),
    (STUDY.replace('[[rows]]\nlabel = "E2E"', '[[rows]]\nlabel = "Local, linear"'), "appear twice"),
    (STUDY + '\n[[columns]]\nlabel = "X"\ndevice = "cpu"\n', "--device on the command line"),
    (STUDY.replace('width = 2', 'width = 2\ndata_dir = "data"'), "--data-dir on the command line"),
    ("name = [", "not valid TOML"),
])
def test_toml_refusals_name_the_key(tmp_path, text, words):
    with pytest.raises(FwdTransError) as info:
        cells(load_spec(write(tmp_path, text)))
    assert words in str(info.value)


def test_auto_engine_follows_the_measured_costs():
    assert auto_engine({"space": "activity"}) == "forward"
    assert auto_engine({"space": "activity", "per_sample": "exact"}) == "reference"
    assert auto_engine({"space": "weight"}) == auto_engine({"space": "span"}) == "reference"
    assert auto_engine({"space": "weight", "granularity": "joint"}) == "forward"
    assert auto_engine({"space": "weight", "granularity": "sample"}) == "reference"  # B streams per tensor forward
    # backprop, local learning and the forward engine's own options get the forward engine (any other is refused)
    assert auto_engine({"space": "weight", "guess": "global"}) == "forward"
    assert auto_engine({"space": "weight", "target": "local", "guess": "local"}) == "forward"
    assert auto_engine({"space": "span", "recompute": True}) == "forward"


def test_table_places_ours_and_the_paper_in_the_right_cells():
    spec = StudySpec("t", "T", rows=(Row("E2E", {"guess": "global"}, {"8b A": "94.5 ± 0.2"}, columns=("8b A",)),
                                     Row("Local, CNN", {"guess": "local"}, {"8b A": "90.4 ± 0.2",
                                                                            "8b W": "92.0 ± 0.3"})),
                     columns=(Column("8b A", {"space": "activity"}), Column("8b W", {"space": "weight"})),
                     seeds=(0, 1, 2), overrides=(Override({"space": "weight"}, {"lr": 0.01}),))
    runs = cells(spec)
    accuracy = {"e2e__8b-a": (0.90, 0.92, 0.94), "local-cnn__8b-a": (0.50, 0.60, None),
                "local-cnn__8b-w": (None, None, None)}
    results = {c.name: {"state": "done" if accuracy[c.name[:-7]][c.seed] is not None else "unfinished",
                        "accuracy": accuracy[c.name[:-7]][c.seed]} for c in runs}
    md, table = format_table(spec, runs, results)
    lines = md.splitlines()
    assert lines[0] == "| guess | 8b A | paper | 8b W | paper |"
    assert lines[2] == "| E2E | 92.0 ± 2.0 | 94.5 ± 0.2 | · |  |"
    assert lines[3] == "| Local, CNN | 55.0 ± 7.1 (2/3 runs) | 90.4 ± 0.2 |  | 92.0 ± 0.3 |"
    rows = list(csv.DictReader(table.splitlines()))
    assert [(r["row"], r["column"], r["finished"], r["mean"], r["paper"], r["engine"]) for r in rows] == [
        ("E2E", "8b A", "3", "92.00", "94.5 ± 0.2", "forward"),
        ("Local, CNN", "8b A", "2", "55.00", "90.4 ± 0.2", "forward"),
        ("Local, CNN", "8b W", "0", "", "92.0 ± 0.3", "reference"),
    ]


def test_study_resumes_after_a_crash_in_the_middle_of_a_run(tmp_path):
    out = tmp_path / "out"
    argv = ["study", "--config", str(write(tmp_path)), "--out", str(out), "--threads", "1", "--device", "cpu"]
    died = run_until(argv, 6 + 4)  # run 1: 2 epochs x 3 steps; run 2 dies in its second epoch
    assert died.returncode == 9, died.stderr
    first = out / "runs" / "e2e__a__seed0"
    assert (first / "summary.json").is_file()
    finished_at = (first / "summary.json").stat().st_mtime_ns
    assert len((out / "runs" / "local-linear__a__seed0" / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(argv) == 0
    assert (first / "summary.json").stat().st_mtime_ns == finished_at  # the finished run was not rerun
    segments = json.loads((out / "runs" / "local-linear__a__seed0" / "config.json").read_text())["segments"]
    assert [s["start_epoch"] for s in segments] == [0, 1]  # the interrupted run resumed from its checkpoint
    table = (out / "table.md").read_text()
    assert "| E2E |" in table and "94.5 ± 0.2" in table and "Not finished" not in table
    assert len(list(csv.DictReader((out / "table.csv").read_text().splitlines()))) == 3


def test_study_dry_run_and_list(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", "--config", str(write(tmp_path)), "--out", str(out), "--threads", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "e2e__a__seed0" in text and "new" in text and "estimated" in text
    assert (out / "step_times.json").is_file() and not (out / "runs").exists()
    assert main(["study", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "mini" in listing and "paper-table2" in listing


def test_study_refuses_bad_invocations(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path)]) == 2
    assert "name a preset" in capsys.readouterr().err
    assert main(["study", "mini"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["study", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert "mini" in capsys.readouterr().err
    assert main(["study", "--config", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert "jobs=0" in capsys.readouterr().err


def test_smoke_preset_end_to_end(tmp_path, capsys):
    """The whole pipeline on a few hundred images: runs, table, CSV and plots (with matplotlib)."""
    out = tmp_path / "smoke"
    assert main(["study", "smoke", "--out", str(out), "--threads", "2", "--device", "cpu"]) == 0
    table = (out / "table.md").read_text()
    assert table.startswith("# Smoke test") and "| E2E (backprop) |" in table and "Engines: A: forward" in table
    assert "Not finished" not in table and "Failed" not in table
    summary = json.loads((out / "runs" / "gaussian__a__seed0" / "summary.json").read_text())
    assert set(summary["probes"]) == {f"probe_{s}_loss/head{j}" for s in ("train", "test") for j in range(3)}
    metrics = (out / "runs" / "local-linear__a__seed0" / "metrics.jsonl").read_text()
    assert "guess_cosine/block2" in metrics
    pytest.importorskip("matplotlib")
    assert {p.name for p in out.glob("*.png")} == {"accuracy.png", "cosine.png", "local_losses.png"}


def test_jobs_run_cells_in_parallel_processes(tmp_path):
    out = tmp_path / "out"
    argv = ["study", "--config", str(write(tmp_path, STUDY.replace("epochs = 2", "epochs = 1"))), "--out", str(out),
            "--device", "cpu", "--jobs", "2"]
    assert main(argv) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["e2e__a__seed0", "local-linear__a__seed0", "local-linear__w__seed0"]
    assert all((out / "runs" / r / "summary.json").is_file() for r in runs)
    assert json.loads((out / "runs" / runs[0] / "config.json").read_text())["segments"][0]["threads"] == max(
        1, (os.cpu_count() or 1) // 2)  # each job gets an equal share of the cores


def test_published_run_files_hold_no_machine_path():
    """The committed study records the data folder by its name only (``data_dir``), never an absolute path."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / "mini"
    configs = [r["config"] for r in json.loads((folder / "study.json").read_text())["runs"]]
    for run in (folder / "runs").iterdir():
        configs += [json.loads((run / name).read_text())["config"] for name in ("config.json", "summary.json")]
    assert len(configs) > 2 and all(c["data_dir"] in (None, "data") for c in configs)


def test_a_study_records_the_data_folder_by_name(tmp_path):
    data = tmp_path / "machine" / "data"
    data.mkdir(parents=True)
    spec = load_spec(write(tmp_path, STUDY))
    from fwdtrans.app._study import _record

    _record(spec, cells(spec, data_dir=str(data)), tmp_path)
    assert {r["config"]["data_dir"] for r in json.loads((tmp_path / "study.json").read_text())["runs"]} == {"data"}


def test_the_results_page_shows_the_table_of_its_committed_files():
    """docs/results.md is built from docs/results/mini: the table rebuilt from the committed runs is the
    page's, and every run of the preset finished."""
    from pathlib import Path

    from fwdtrans.app._presets import preset
    from fwdtrans.app._report import collect

    root = Path(__file__).resolve().parents[1] / "docs"
    folder = root / "results" / "mini"
    spec = preset("mini")
    runs = cells(spec)
    results = collect(runs, folder)
    assert {r["state"] for r in results.values()} == {"done"}
    md, table = format_table(spec, runs, results)
    assert md in (root / "results.md").read_text()
    assert table == (folder / "table.csv").read_text()


def test_the_studies_page_lists_every_preset_with_its_run_count():
    from pathlib import Path

    from fwdtrans.app._presets import PRESETS

    lines = (Path(__file__).resolve().parents[1] / "docs" / "study.md").read_text().splitlines()
    for name, p in PRESETS.items():
        row = next(line for line in lines if line.startswith(f"| `{name}` |"))
        assert row.endswith(f"| {len(cells(p.build(False)))} |"), row
