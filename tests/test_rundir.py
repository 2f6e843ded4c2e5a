"""Run directories a new user gets wrong: a damaged summary, a run whose checkpoint is gone, an unrelated folder."""

import json
import time

import pytest

import fwdtrans
from fwdtrans.app import TrainConfig, train
from fwdtrans.app._cli import main
from fwdtrans.app._rundir import RunDir

# 96 images, batch 32: 3 steps per epoch
TINY = ["--width", "2", "--blocks", "2", "--heads", "linear", "--limit", "96", "--batch-size", "32",
        "--threads", "1", "--device", "cpu"]


def test_a_corrupt_summary_is_refused_by_name_with_the_fix(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    (run / "summary.json").write_text('{"config": ')  # cut short
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "Fix: delete it" in err and "Traceback" not in err
    (run / "summary.json").unlink()  # the fix: the checkpoint rewrites it
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"][0]["epoch"] == 1


def test_a_run_without_its_checkpoint_is_not_restarted_over_its_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    (run / "checkpoint.pt").unlink()
    (run / "summary.json").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "model.pt" in err and "checkpoint.pt" in err and "Fix:" in err
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing overwritten
    for name in ("metrics.jsonl", "model.pt", "config.json"):  # the fix: start over
        (run / name).unlink()
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0


def test_an_unrelated_folder_is_refused_naming_what_is_there(tmp_path, capsys):
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "src" in err and "Fix:" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "src"]  # nothing written there


def test_an_empty_folder_and_a_failed_study_run_are_run_directories(tmp_path):
    RunDir(tmp_path / "empty").path.mkdir()
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "failed.json").write_text("{}")  # what a study leaves in a run that failed
    config = TrainConfig(width=2, blocks=2, heads="linear", limit=64, batch_size=32, epochs=1, threads=1, device="cpu")
    for run in (tmp_path / "empty", failed):
        assert train(config, run_dir=str(run))["epochs"][0]["epoch"] == 1


def test_an_interrupted_epoch_counts_its_whole_time(tmp_path, monkeypatch):
    """The epoch's seconds and the run's seconds per step include the part before the interruption."""
    config = TrainConfig(width=2, blocks=2, heads="linear", limit=96, batch_size=32, epochs=1, threads=1, device="cpu",
                         checkpoint_every=1)
    original, taken = fwdtrans.Converted.train_step, [0]

    def slow_train_step(self, optimizer, **kwargs):  # 1.5 s a step; Ctrl-C before the third (of 3)
        step = original(self, optimizer, **kwargs)

        def slow(x, y):
            taken[0] += 1
            if taken[0] == 3:
                raise KeyboardInterrupt
            time.sleep(1.5)
            return step(x, y)
        return slow

    monkeypatch.setattr(fwdtrans.Converted, "train_step", slow_train_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=str(tmp_path / "run"))
    monkeypatch.undo()
    summary = train(config, run_dir=str(tmp_path / "run"))  # the last step, fast
    assert summary["epochs"][0]["seconds"] >= 3.0 and summary["seconds"] >= 3.0
    assert summary["first_step_seconds"] >= 1.5 and summary["seconds_per_step"] >= 1.5  # the second step's
