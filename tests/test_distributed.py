"""Data-parallel steps on torch.distributed: two gloo ranks on 127.0.0.1, each on half of every batch, end
with the parameters, buffers, metrics and noise generator of one process on the whole batches (float64);
a rank that fails ends the others with a clear error within the group's timeout; ``fwdtrans train`` under
``torchrun --nproc-per-node 2``, killed and resumed, ends with the metrics of an uninterrupted 2-rank run, and
resumed on another number of ranks goes on in the same data order; ``fwdtrans study`` under torchrun writes on
rank 0 only.

The ranks are separate processes (``tests/dp_worker.py``); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dp_worker
import pytest
import torch

import fwdtrans
from fwdtrans.app import load_dataset
from fwdtrans.app._batches import epoch_generator
from fwdtrans.app._cli import _config, _parser, main
from fwdtrans.app._rundir import RunDir

WORKER = Path(__file__).parent / "dp_worker.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(case: str, out: Path, timeout: float = 120, group_timeout: float = 60, wait: tuple[int, ...] = (0, 1)
           ) -> list[dict]:
    """Run ``case`` on two ranks; return what each rank in ``wait`` wrote (the others are ended)."""
    port = _port()
    env = {**ENV, "DP_TIMEOUT": str(group_timeout)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), case, str(r), "2", str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        for r in wait:
            procs[r].wait(timeout=timeout)
    finally:
        logs = []
        for p in procs:
            if p.poll() is None:
                p.kill()
            logs.append(p.communicate()[0])
    results = []
    for r in wait:
        path = out / f"{case}.{r}.pt"
        assert path.is_file(), f"rank {r} wrote nothing:\n{logs[r][-3000:]}"
        results.append(torch.load(path, weights_only=False))
    return results


def _assert_same_run(actual: dict, expected: dict, name: str) -> None:
    for k, v in expected["state"].items():
        torch.testing.assert_close(actual["state"][k], v, rtol=1e-9, atol=1e-12, msg=f"{name}: {k}")
    for got, want in zip(actual["metrics"], expected["metrics"], strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-12), f"{name}: {k}"
    assert torch.equal(actual["generator"], expected["generator"]), f"{name}: the noise generator left its course"


def test_two_ranks_on_half_batches_equal_one_process_on_the_whole_batch(tmp_path):
    """Every method family, GroupNorm (nothing couples samples) or BatchNorm with sync_batchnorm=True; uneven
    shares (5 + 3 samples); many small gradient buckets (the overlapped path). BatchNorm without synchronisation
    is not one process's step, but leaves the same parameters and running statistics on every rank."""
    ranks = _ranks("equivalence", tmp_path)
    references: dict[str, dict] = {}
    for name in dp_worker.PER_RANK:  # BatchNorm per rank: the running statistics averaged, the same everywhere
        states = [rank.pop(name)["state"] for rank in ranks]
        assert any(k.endswith("running_var") for k in states[0])
        for k, v in states[0].items():
            assert torch.equal(states[1][k], v), f"{name}: {k} differs between the ranks"
    for name in ranks[0]:
        if name == "refused":
            continue
        base = dp_worker.UNEVEN.get(name, "flagship" if name == "flagship-buckets" else name)
        if base not in references:
            references[base] = dp_worker.train(base)  # this process: no group, the whole batches
        for rank in ranks:
            _assert_same_run(rank[name], references[base], name)
        for k, v in ranks[0][name]["state"].items():  # the ranks agree bit for bit
            assert torch.equal(ranks[1][name]["state"][k], v), f"{name}: {k} differs between the ranks"
    errors = ranks[0]["refused"]
    assert "compile=True" in errors["compile"] and "eager step" in errors["compile"]
    assert "per_sample='exact'" in errors["exact"] and "space='span'" in errors["span"]


def test_compiled_two_rank_step_equals_one_process(tmp_path):
    """The compiled step (aot_eager: the captured graph without code generation): the activity space's buckets
    after the graph, the weight space's guesses and directional derivatives inside it (functional collectives)."""
    ranks = _ranks("compiled", tmp_path)
    for name in ranks[0]:
        reference = dp_worker.train(name, compile={"backend": "aot_eager"})
        for rank in ranks:
            _assert_same_run(rank[name], reference, name)


@pytest.mark.parametrize("case", ["raises", "stalls"])
def test_a_rank_that_fails_ends_the_others_with_a_clear_error(tmp_path, case):
    """Rank 1 raises in the middle of a step; it exits ("raises") or stays alive without answering ("stalls").
    Rank 0 ends with a FwdTransError naming the cause within the group's timeout (5 s here), never hangs."""
    tick = time.monotonic()
    (rank0,) = _ranks(case, tmp_path, timeout=60, group_timeout=5, wait=(0,))
    assert time.monotonic() - tick < 45
    assert rank0["type"] == "GroupFailure", rank0
    assert "Another rank raised, died or did not answer" in rank0["error"]
    assert rank0["seconds"] < (5 if case == "raises" else 15)


def test_missing_torchrun_variables_are_a_clear_error(monkeypatch, capsys):
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--width", "2", "--blocks", "2", "--limit", "64", "--batch-size", "32", "--epochs",
                 "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set" in err and "torchrun" in err


def test_a_rank_that_never_comes_is_a_clear_error_within_the_timeout(tmp_path):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_port())}
    tick = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fwdtrans", "train", "--width", "2", "--blocks", "2", "--limit",
                           "64", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--dist-timeout", "3"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "fwdtrans: error (rank 0): rank 0 of 2 could not join the process group" in done.stderr
    assert time.monotonic() - tick < 40


# 128 images, global batch 32 (16 per rank): 4 steps per epoch
TINY = ["--width", "2", "--blocks", "2", "--heads", "linear", "--limit", "128", "--batch-size", "32", "--threads",
        "1", "--device", "cpu", "--epochs", "2", "--guess", "gaussian", "--lr", "0.01", "--checkpoint-every", "2"]


def _torchrun(argv: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    target = [str(script)] if script is not None else ["-m", "fwdtrans"]
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
               str(_port()), *target, *argv]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(run_dir).read_metrics()]


def test_torchrun_train_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """``torchrun --nproc-per-node 2 -m fwdtrans train`` on the shipped subset; a second run's rank 1 dies
    (``os._exit``) before step 7 (of 8); the same command resumes it from the last checkpoint."""
    whole = _torchrun(["train", *TINY, "--run-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert whole.stdout.count("epoch 1/2") == 1  # rank 0 alone logs
    crash = tmp_path / "crash.py"
    crash.write_text(textwrap.dedent(f"""
        import os, sys, fwdtrans
        from fwdtrans.app import main
        original, taken = fwdtrans.Converted.train_step, [0]
        def train_step(self, optimizer, **kwargs):
            step = original(self, optimizer, **kwargs)
            def stopping(x, y):
                if taken[0] == 6 and os.environ["RANK"] == "1":
                    os._exit(9)
                taken[0] += 1
                return step(x, y)
            return stopping
        fwdtrans.Converted.train_step = train_step
        sys.exit(main({["train", *TINY, "--run-dir", str(tmp_path / "crashed")]!r}))
    """))
    died = _torchrun([], script=crash)
    assert died.returncode != 0
    assert [r["epoch"] for r in _metrics(tmp_path / "crashed")] == [1]
    resumed = _torchrun(["train", *TINY, "--run-dir", str(tmp_path / "crashed")])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _metrics(tmp_path / "crashed") == _metrics(tmp_path / "whole")  # bit for bit
    segments = json.loads((tmp_path / "crashed" / "config.json").read_text())["segments"]
    assert [s["ranks"] for s in segments] == [2, 2] and segments[1]["start_step"] in (4, 6)
    assert torch.equal(torch.load(tmp_path / "whole" / "model.pt")["fc.weight"],
                       torch.load(tmp_path / "crashed" / "model.pt")["fc.weight"])


def test_a_run_directory_rank_0_cannot_open_ends_every_rank_at_once(tmp_path):
    """Rank 0 alone opens (and locks) the run directory; when it cannot (here: this test holds its lock, as
    another run training in it would), every rank stops at once with an error, not after --dist-timeout."""
    holder = RunDir(tmp_path / "run")
    holder.prepare()
    try:
        tick = time.monotonic()
        done = _torchrun(["train", *TINY, "--run-dir", str(tmp_path / "run"), "--dist-timeout", "300"])
        seconds = time.monotonic() - tick
    finally:
        holder.release()
    assert done.returncode != 0
    assert "fwdtrans: error (rank 0): another process is training in" in done.stderr, done.stderr
    assert "fwdtrans: error (rank 1): rank 0 failed to open the run directory" in done.stderr, done.stderr
    assert seconds < 60


def test_each_rank_takes_its_contiguous_slice_of_every_global_batch():
    x, y = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).view(10, 3, 2, 2), torch.arange(10)
    options = dict(mean=(0.0,) * 3, std=(1.0,) * 3, shuffle=True, augment=False, drop_last=True)
    whole = [yb for _, yb in fwdtrans.app.batches(x, y, 4, generator=torch.Generator().manual_seed(1), **options)]
    parts = [[yb for _, yb in fwdtrans.app.batches(x, y, 4, generator=torch.Generator().manual_seed(1),
                                                   shard=(r, 2), **options)] for r in range(2)]
    assert [torch.cat([a, b]).tolist() for a, b in zip(*parts, strict=True)] == [b.tolist() for b in whole]
    resumed = [yb for _, yb in fwdtrans.app.batches(x, y, 4, generator=torch.Generator().manual_seed(1), start=1,
                                                    shard=(1, 2), **options)]
    assert [b.tolist() for b in resumed] == [b.tolist() for b in parts[1][1:]]


def _launch(ranks: int, argv: list[str], record: Path, tag: str, *, watch: Path | None = None,
            die: int | None = None) -> subprocess.CompletedProcess:
    """``fwdtrans ARGV`` through ``dp_worker.py app``: on ``ranks`` processes under torchrun, or one plain process
    (no torchrun, no group); each batch's labels recorded under ``record`` (see :func:`dp_worker.app`)."""
    record.mkdir(exist_ok=True)
    env = {**ENV, "DP_RECORD": str(record), "DP_TAG": tag, **({"DP_WATCH": str(watch)} if watch else {}),
           **({"DP_DIE": str(die)} if die is not None else {})}
    command = [sys.executable, str(WORKER), "app", *argv] if ranks == 1 else [
        str(TORCHRUN), "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1", "--master-port", str(_port()),
        str(WORKER), "app", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _labels(record: Path, tag: str, rank: int) -> list[list[int]]:
    path = record / f"{tag}.{rank}.labels"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _global_batches() -> list[list[int]]:
    """The labels of every global batch of TINY's run, in order: its epochs' plans, drawn in this process."""
    config = _config(_parser("train").parse_args(["train", *TINY]))
    data = load_dataset(config.dataset, config.data_dir)
    x, y = data.train_x[:config.limit], data.train_y[:config.limit]
    return [yb.tolist() for epoch in range(config.epochs)
            for _, yb in fwdtrans.app.batches(x, y, config.batch_size, mean=data.mean, std=data.std, shuffle=True,
                                              augment=config.augment and data.augment, drop_last=True,
                                              generator=epoch_generator(config.seed, epoch))]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumes_with_a_different_number_of_ranks(tmp_path, before, after):
    """A run on ``before`` processes dies before step 7 (of 8; checkpoints every 2 steps) and resumes on ``after``:
    the global batches stay the same (each rank takes its slice), the resumed run goes on from the checkpoint's
    place in the data order and ends after as many steps as an uninterrupted run; config.json records the ranks.
    (Not bit for bit: BatchNorm normalises each rank's share of the batch on its own.)"""
    run, record = tmp_path / "run", tmp_path / "record"
    argv = ["train", *TINY, "--run-dir", str(run)]
    died = _launch(before, argv, record, "first", die=6)
    assert died.returncode != 0
    resumed = _launch(after, argv, record, "second")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    segments = json.loads((run / "config.json").read_text())["segments"]
    assert [s["ranks"] for s in segments] == [before, after]
    start = segments[1]["start_step"]
    assert start in (4, 6)  # rank 0 may or may not have saved step 6 before rank 1 died
    assert [(r["epoch"], r["step"]) for r in _metrics(run)] == [(1, 4), (2, 8)]
    # the labels each process stepped on, joined rank by rank, are the global batches of an uninterrupted run
    # (a rank that did not die may have taken one step more, and waited for the dead one)
    first = [sum(parts, []) for parts in zip(*(_labels(record, "first", r) for r in range(before)), strict=False)]
    second = [sum(parts, []) for parts in zip(*(_labels(record, "second", r) for r in range(after)), strict=True)]
    assert first[:start] + second == _global_batches()
    assert all(len(_labels(record, "second", r)) == 8 - start for r in range(after))
    assert len(_labels(record, "second", 0)[0]) == 32 // after  # each rank's slice of the global batch of 32


def test_torchrun_study_writes_on_rank_0_only_and_resumes(tmp_path):
    """``torchrun --nproc-per-node 2 -m fwdtrans study --config`` on two tiny cells: both done, the study's files
    and run directories written by rank 0 alone (rank 1 creates, writes, renames or removes nothing under the
    study's folder), the log printed once; the same command again skips the finished runs."""
    config, out, record = tmp_path / "tiny.toml", tmp_path / "study", tmp_path / "record"
    config.write_text(textwrap.dedent("""
        name = "tiny"
        title = "Two tiny runs"
        seeds = [0]

        [train]
        width = 2
        blocks = 2
        heads = "linear"
        limit = 128
        batch_size = 32
        epochs = 1

        [[columns]]
        label = "A"
        space = "activity"

        [[rows]]
        label = "Local"
        guess = "local"

        [[rows]]
        label = "Backprop"
        guess = "global"
    """))
    argv = ["study", "--config", str(config), "--out", str(out), "--device", "cpu", "--threads", "1"]
    done = _launch(2, argv, record, "first", watch=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("study tiny: 2 runs, 0 finished, 2 to run") == 1
    assert done.stdout.count("epoch 1/1") == 2 and done.stdout.count("tables and plots:") == 1
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 and all((out / "runs" / r / "summary.json").is_file() for r in runs)
    assert all(json.loads((out / "runs" / r / "summary.json").read_text())["ranks"] == 2 for r in runs)
    assert (out / "table.md").is_file() and (out / "study.json").is_file()
    writes = {r: json.loads((record / f"first.{r}.writes").read_text()) for r in range(2)}
    assert writes[1] == [] and any(w.endswith("table.md") for w in writes[0])
    assert len(_labels(record, "first", 1)) == 2 * 4  # rank 1 trained both cells, 4 steps each
    again = _launch(2, argv, record, "again", watch=out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("study tiny: 2 runs, 2 finished, 0 to run") == 1 and "epoch" not in again.stdout
    assert _labels(record, "again", 0) == [] == _labels(record, "again", 1)
