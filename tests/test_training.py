"""Real runs: run directories that survive a crash, resume bit for bit, refuse other settings, export weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from crashes import run_until

import fwdtrans
from fwdtrans.app import TrainConfig, batches, load_dataset, train
from fwdtrans.app._cli import main
from fwdtrans.app._rundir import RunDir, load_checkpoint, save_checkpoint

# 96 images, batch 32: 3 steps per epoch
TINY = ["--width", "2", "--blocks", "2", "--heads", "linear", "--limit", "96", "--batch-size", "32",
        "--threads", "1", "--device", "cpu"]
TIMING = ("seconds",)


def metrics(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir(run_dir).read_metrics()]


@pytest.mark.parametrize("guess, crash, every", [
    ("local", 3, 0),  # killed right after the first epoch's checkpoint
    ("gaussian", 5, 1),  # random guesses, killed in the middle of epoch 2 (checkpoint every step)
])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, guess, crash, every):
    argv = [*TINY, "--epochs", "3", "--guess", guess, "--lr", "0.01", "--checkpoint-every", str(every)]
    assert main(["train", *argv, "--run-dir", str(tmp_path / "whole")]) == 0
    died = run_until(["train", *argv, "--run-dir", str(tmp_path / "crashed")], crash)
    assert died.returncode == 9, died.stderr
    assert len(metrics(tmp_path / "crashed")) == 1  # the first epoch, and only it, was recorded
    assert main(["train", *argv, "--run-dir", str(tmp_path / "crashed")]) == 0
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "crashed")
    assert [r["epoch"] for r in whole] == [1, 2, 3]
    assert resumed == whole  # every per-epoch metric, bit for bit
    segments = json.loads((tmp_path / "crashed" / "config.json").read_text())["segments"]
    assert [s["start_epoch"] for s in segments] == [0, 1]
    assert segments[1]["start_step"] == (crash if every else crash // 3 * 3)
    assert torch.equal(torch.load(tmp_path / "whole" / "model.pt")["fc.weight"],
                       torch.load(tmp_path / "crashed" / "model.pt")["fc.weight"])


def test_metrics_never_hold_an_epoch_the_checkpoint_does_not(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run)]) == 0
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and [r["epoch"] for r in checkpoint["history"]] == [1, 2]
    # a metrics line written after a checkpoint that a crash then lost is dropped on resume
    RunDir(run).append_metrics({"epoch": 3, "train_loss": 0.0})
    (run / "summary.json").unlink()
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run)]) == 0
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]


def test_extending_a_finished_run_equals_a_longer_run(tmp_path):
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "short")]) == 0
    first = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "short")]) == 0  # finished: no-op
    assert json.loads((tmp_path / "short" / "summary.json").read_text()) == first
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(tmp_path / "short")]) == 0
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(tmp_path / "long")]) == 0
    assert metrics(tmp_path / "short") == metrics(tmp_path / "long")


def test_other_settings_are_refused_naming_the_keys(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", run]) == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", run, "--lr", "0.1", "--guess", "ntk"]) == 2
    err = capsys.readouterr().err
    assert "guess: recorded 'local', now 'ntk'" in err and "lr: recorded 0.05, now 0.1" in err
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", run, "--limit", "64"]) == 2
    assert "data" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before  # nothing lost


def test_epochs_cannot_shrink(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", run]) == 0
    (tmp_path / "run" / "summary.json").unlink()
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", run]) == 2
    assert "--epochs 2" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    (run / "summary.json").unlink()
    data = (run / "checkpoint.pt").read_bytes()
    damaged = {"truncate": data[:len(data) // 2], "flip": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
               "garbage": b"not a checkpoint"}[damage]
    (run / "checkpoint.pt").write_bytes(damaged)
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Fix: delete" in err


def test_checkpoint_round_trip(tmp_path):
    state = {"a": torch.arange(5), "b": [1.5, {"c": "d"}]}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["a"], state["a"]) and loaded["b"] == state["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left


def test_model_export_loads_into_the_original_model(tmp_path):
    run = tmp_path / "run"
    summary = train(TrainConfig(width=2, blocks=2, heads="linear", limit=96, batch_size=32, epochs=1, threads=1,
                                device="cpu"), run_dir=str(run))
    model = fwdtrans.models.resnet18(width=2)
    model.load_state_dict(torch.load(run / "model.pt"))  # strict: every key, original names
    model.eval()
    data = load_dataset("cifar10")
    correct = 0
    with torch.no_grad():
        for xb, yb in batches(data.test_x, data.test_y, 500, mean=data.mean, std=data.std, shuffle=False,
                              augment=False):
            correct += int((model(xb).argmax(-1) == yb).sum())
    assert correct / len(data.test_y) == summary["test_accuracy"]


def test_run_directory_files(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--guess", "local", "--run-dir", str(run),
                 "--diagnostics-every", "2"]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == [
        "checkpoint.pt", "config.json", "metrics.jsonl", "model.pt", "summary.json"]
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == 1 and config["config"]["step_size"] == 30 and config["config"]["gamma"] == 0.2
    # the method's fields are recorded flat, beside the others, and read back into a Method
    assert config["config"]["guess"] == "local" and "method" not in config["config"]
    assert TrainConfig.from_dict(config["config"]).method == fwdtrans.Method(guess="local")
    assert TrainConfig.from_dict(config["config"]).to_dict() == config["config"]
    assert config["data"] == {"name": "cifar10_subset", "train": 96, "test": 1000, "classes": 10,
                              "shape": [3, 32, 32]}
    assert config["segments"][0]["versions"]["torch"] == torch.__version__
    assert config["config"]["data_dir"] is None  # the shipped subset
    records = RunDir(run).read_metrics()
    for key in ("epoch", "train_loss", "test_loss", "test_accuracy", "lr", "seconds", "train_loss/head0",
                "test_loss/head0", "guess_cosine/block0", "cosine/block0"):
        assert key in records[0], key
    assert -1 <= records[0]["guess_cosine/block0"] <= 1


def test_diagnostics_do_not_change_training(tmp_path):
    argv = [*TINY, "--epochs", "1", "--guess", "gaussian", "--lr", "0.01"]
    assert main(["train", *argv, "--run-dir", str(tmp_path / "a")]) == 0
    assert main(["train", *argv, "--run-dir", str(tmp_path / "b"), "--diagnostics-every", "1"]) == 0
    plain, diagnosed = metrics(tmp_path / "a")[0], metrics(tmp_path / "b")[0]
    assert {k: diagnosed[k] for k in plain} == plain


def test_interrupt_keeps_the_last_checkpoint(tmp_path):
    """SIGINT (Ctrl-C) in the middle of epoch 2: exit code 130, epoch 1's checkpoint intact, resumable."""
    run = tmp_path / "run"
    done = run_until(["train", *TINY, "--epochs", "2", "--run-dir", str(run)], 4, how="interrupt")
    assert done.returncode == 130, done.stderr
    assert "run the same command to resume" in done.stderr
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run)]) == 0
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], "epochs=0"),
    (["--lr", "-1"], "lr=-1.0"),
    (["--limit", "-5"], "limit=-5"),
    (["--batch-size", "200"], "larger than the 96 training images"),
    (["--blocks", "1"], "one block has no cut"),
    (["--device", "cuda:7"], "CUDA device"),
    (["--device", "toaster"], "not a device"),
    (["--gamma", "2"], "gamma=2.0"),
    (["--dataset", "cifar100"], "--data-dir"),
])
def test_cli_refuses_bad_values_before_training(tmp_path, capsys, args, words):
    assert main(["train", *TINY, *args, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fwdtrans: error:") and words in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_refuses_an_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", *TINY, "--run-dir", str(blocker / "run")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_cli_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fwdtrans {fwdtrans.__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--device", "--run-dir", "--checkpoint-every", "--schedule", "--dataset", "--diagnostics-every"):
        assert option in text
    assert "(default: step)" in text and "(default: auto)" in text


def test_cli_help_speaks_of_the_cli(capsys):
    """--no-augment shows no default (augmentation is on), the demo has no run to extend, advice names flags."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-augment turn off the paper's augmentation" in text
    assert "(default: True)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "extends a finished run" not in text and "--epochs EPOCHS epochs to train each method" in text
    assert main(["train", *TINY, "--blocks", "100"]) == 2
    err = capsys.readouterr().err
    assert "--blocks 22" in err and "multi_tensor" not in err and "fwdtrans.inspect" not in err


# the command line in a process whose fwdtrans package skips its __init__ (as a library importing lazily would)
WITHOUT_LIBRARY = """
import importlib.util, sys
package = importlib.util.module_from_spec(importlib.util.find_spec("fwdtrans"))
package.__version__ = "0"
sys.modules["fwdtrans"] = package
from fwdtrans.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "tqdm", "PIL"}))
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["trian"], []])
def test_version_help_and_a_mistyped_command_import_no_training_code(argv):
    done = subprocess.run([sys.executable, "-c", WITHOUT_LIBRARY, *argv], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "[]", done.stderr


def test_fwdtrans_version_does_not_import_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fwdtrans", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "torch" not in [line.split("|")[-1].strip() for line in done.stderr.splitlines()]


def test_log_when_not_a_terminal(tmp_path):
    """No bar in a log file: the data, the steps per epoch, a line every --log-every seconds and one per epoch."""
    done = subprocess.run([sys.executable, "-m", "fwdtrans", "train", *TINY, "--epochs", "2", "--log-every", "1e-9"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar in a log file
    lines = done.stdout.splitlines()
    assert lines[0] == "data: cifar10_subset, 96 training images (of 5000), 1000 test images; 3 steps of 32 per epoch"
    assert [line.split("  ")[0] for line in lines[1:4]] == ["epoch 1/2: step 1/3", "epoch 1/2: step 2/3",
                                                            "epoch 1/2: step 3/3"]
    assert lines[4].startswith("epoch 1/2: train loss")
    assert "train loss" in lines[1] and lines[-1].startswith("test accuracy") and len(lines) == 10


def test_a_resumed_run_says_where_it_resumes(tmp_path, capsys):
    argv = ["train", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--run-dir", str(tmp_path / "run")]
    assert run_until(argv, 4).returncode == 9  # killed in epoch 2, after its first step
    assert main([*argv, "--log-every", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"resuming {tmp_path / 'run'} at epoch 2/2, step 2/3 (checkpoint.pt after 4 steps)"
    assert lines[2].startswith("epoch 2/2: train loss") and len(lines) == 4


def test_same_seed_same_run_and_demo_table(tmp_path, capsys):
    runs = [train(TrainConfig(width=2, blocks=2, heads="linear", limit=64, batch_size=32, epochs=1, seed=5,
                              threads=1))["epochs"][0] for _ in range(2)]
    assert {k: v for k, v in runs[0].items() if k not in TIMING} == {k: v for k, v in runs[1].items()
                                                                    if k not in TIMING}
    assert main(["demo", "--width", "2", "--blocks", "2", "--heads", "linear", "--limit", "64", "--batch-size", "32",
                 "--threads", "1", "--out", str(tmp_path / "demo.json")]) == 0
    table = capsys.readouterr().out
    assert "backprop" in table and "forward gradient" in table and "local learning" in table
    assert len(json.loads((tmp_path / "demo.json").read_text())["runs"]) == 3


def test_bad_method_is_a_clean_error(capsys):
    assert main(["train", *TINY, "--target", "local", "--guess", "global"]) == 2
    assert "fwdtrans: error: invalid method" in capsys.readouterr().err


def test_write_json_is_atomic(tmp_path):
    from fwdtrans.app._rundir import write_json

    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"b": object()})  # fails while serialising: the old file stays whole
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar100", "imagenet32"])
def test_train_on_each_dataset(tmp_path, dataset):
    """The model takes the data's channels and classes; the paper's schedule and augmentation per data set."""
    from datafiles import imagenet32_split, random_split, write_cifar100, write_fashion, write_imagenet32

    if dataset == "fashion-mnist":
        write_fashion(tmp_path / "data", random_split(1, 28, 10, n_train=64, n_test=8))
    elif dataset == "cifar100":
        write_cifar100(tmp_path / "data" / "cifar-100-python", random_split(3, 32, 100, n_train=64, n_test=8))
    else:
        write_imagenet32(tmp_path / "data", imagenet32_split())
    run = tmp_path / "run"
    assert main(["train", "--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--width", "2", "--blocks", "2",
                 "--heads", "linear", "--batch-size", "8", "--epochs", "1", "--threads", "1",
                 "--run-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    shape, classes = {"fashion-mnist": ([1, 28, 28], 10), "cifar100": ([3, 32, 32], 100),
                      "imagenet32": ([3, 32, 32], 1000)}[dataset]
    assert config["data"]["shape"] == shape and config["data"]["classes"] == classes
    summary = json.loads((run / "summary.json").read_text())
    assert config["config"]["data_dir"] == summary["config"]["data_dir"] == "data"  # the folder's name, not its path
    assert (config["config"]["step_size"], config["config"]["gamma"]) == ((20, 0.1) if dataset == "imagenet32"
                                                                         else (30, 0.2))
    assert torch.load(run / "model.pt")["fc.weight"].shape == (classes, 16)


def test_tensorboard_is_optional(tmp_path, capsys):
    import importlib.util

    args = ["train", *TINY, "--epochs", "1", "--tensorboard", "--run-dir", str(tmp_path / "run")]
    if importlib.util.find_spec("tensorboard") is None:
        assert main(args) == 2
        assert "pip install tensorboard" in capsys.readouterr().err
    else:
        assert main(args) == 0
        assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_two_processes_cannot_train_in_one_run_dir(tmp_path, capsys):
    busy = RunDir(tmp_path / "run")
    busy.prepare()  # another process holds the run directory
    try:
        assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "run")]) == 2
        assert "another process is training in" in capsys.readouterr().err
    finally:
        busy.release()
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "run")]) == 0
