"""The command line: `fwdtrans train` writes an atomic JSON summary; `fwdtrans demo` prints the table."""

import json

import pytest

from fwdtrans._cli import main
from fwdtrans._train import write_json

TINY = ["--width", "2", "--blocks", "2", "--heads", "linear", "--limit", "64", "--batch-size", "32", "--threads", "1"]


def test_train_writes_a_summary(tmp_path, capsys):
    out = tmp_path / "runs" / "summary.json"
    assert main(["train", *TINY, "--epochs", "2", "--seed", "3", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["config"]["seed"] == 3 and summary["config"]["target"] == "global"
    assert summary["method"]["guess"] == "local" and len(summary["cuts"]) == 1
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["dataset"] == {"name": "cifar10_subset", "train": 64, "test": 1000}
    assert "torch" in summary["versions"]
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind
    assert "test accuracy" in capsys.readouterr().out


def test_same_seed_same_run(tmp_path):
    runs = []
    for name in ("a", "b"):
        main(["train", *TINY, "--epochs", "1", "--seed", "5", "--out", str(tmp_path / f"{name}.json")])
        runs.append(json.loads((tmp_path / f"{name}.json").read_text())["epochs"][0])
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]


def test_demo_prints_a_table(capsys):
    assert main(["demo", *TINY, "--epochs", "1"]) == 0
    table = capsys.readouterr().out
    assert "backprop" in table and "forward gradient" in table and "local learning" in table


def test_bad_method_is_a_clean_error(capsys):
    assert main(["train", *TINY, "--target", "local", "--guess", "global"]) == 2
    assert "fwdtrans: error:" in capsys.readouterr().err


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"b": object()})  # fails while serialising: the old file stays whole
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
