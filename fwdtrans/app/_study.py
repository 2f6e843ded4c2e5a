"""``fwdtrans study``: run every cell of a study in its own run directory, then write its report.

``DIR/study.json`` records the study and its runs, ``DIR/runs/<row>__<column>__seed<k>/`` holds one
run directory per cell (``_rundir``). Re-running the same command skips finished runs and resumes
unfinished ones from their checkpoints; a run that fails (e.g. a diverging random guess) leaves a
``failed.json`` and the study goes on. After every finished run the report (``_report``) is
written again from whatever has finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .._distributed import GroupFailure
from .._errors import FwdTransError
from ._batches import num_batches
from ._config import TrainConfig
from ._group import join_group, resolve_device
from ._loop import build, train
from ._report import write_report
from ._rundir import FORMAT, RunDir, write_json
from ._studyspec import Cell, StudySpec, cells

__all__ = ["estimate", "run_study", "status"]

# per data set: training images, image shape, classes (cifar10 without a folder: the shipped subset, 5,000)
_DATA = {"cifar10": (50_000, (3, 32, 32), 10), "cifar100": (50_000, (3, 32, 32), 100),
         "fashion-mnist": (60_000, (1, 28, 28), 10), "imagenet32": (1_281_167, (3, 32, 32), 1000)}
_SHIPPED = 5_000


def run_study(spec: StudySpec, out: str | os.PathLike, *, data_dir: str | None = None, device: str = "auto",
              threads: int | None = None, jobs: int = 1, log: Callable[[str], None] = print,
              progress: Callable | None = None) -> list[Cell]:
    """Run (or resume) every cell of ``spec`` under ``out``; write the report; return the cells.

    ``jobs > 1`` runs that many cells at once in separate processes (on a CPU, each with
    ``threads`` or an equal share of the cores). Under ``torchrun`` every rank runs every cell, data
    parallel, one at a time; rank 0 alone writes the study's files and logs.
    """
    if jobs < 1:
        raise FwdTransError(f"jobs={jobs}: use at least 1.")
    study_cells = cells(spec, data_dir=data_dir, device=device, threads=threads)
    timeout = max((c.config.dist_timeout for c in study_cells), default=TrainConfig.dist_timeout)
    world, _ = join_group(resolve_device(device), timeout)  # under torchrun: the study's dist_timeout
    if world.size > 1 and jobs > 1:
        raise FwdTransError(f"jobs={jobs} under torchrun ({world.size} ranks): the ranks run each cell together. Fix: "
                            "--jobs 1.")
    if not world.main:
        log, progress = (lambda line: None), None
    out = Path(out)
    todo = [c for c in study_cells if status(c, out)[0] != "done"]
    world.barrier("before the study's files are written")  # every rank has read the runs' status
    if world.main:
        _record(spec, study_cells, out)
    report = write_report if world.main else (lambda *args: None)
    log(f"study {spec.name}: {len(study_cells)} runs, {len(study_cells) - len(todo)} finished, {len(todo)} to run")
    if jobs == 1:
        for i, cell in enumerate(todo):
            log(f"[{i + 1}/{len(todo)}] {cell.name}")
            _run_cell(cell, out, progress=progress, log=log, main=world.main)
            report(spec, study_cells, out)
    else:
        per_job = threads or max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(_run_cell, dataclasses.replace(c, config=dataclasses.replace(
                c.config, threads=c.config.threads or per_job)), out): c for c in todo}
            for future in concurrent.futures.as_completed(futures):
                log(f"{futures[future].name}: {future.result()}")
                write_report(spec, study_cells, out)
    report(spec, study_cells, out)
    return study_cells


def _run_cell(cell: Cell, out: Path, progress: Callable | None = None, log: Callable | None = None,
              main: bool = True) -> str:
    run = out / "runs" / cell.name
    failed = run / "failed.json"
    try:
        summary = train(cell.config, run_dir=str(run), progress=progress, log=log)
    except GroupFailure:
        raise  # a rank failed or died: the next cells cannot run either
    except FwdTransError as e:
        if main:
            write_json(failed, {"error": str(e), "epochs": len(RunDir(run).read_metrics())})
        if log is not None:
            log(f"  failed: {e}")
        return f"failed: {e}"
    if failed.exists() and main:
        failed.unlink()
    return f"test accuracy {summary['test_accuracy']:.2%}"


def _record(spec: StudySpec, study_cells: list[Cell], out: Path) -> None:
    """Write ``study.json``; refuse an output folder that holds another study."""
    path = out / "study.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("name") != spec.name:
            raise FwdTransError(f"{out} holds the study {recorded.get('name')!r}, not {spec.name!r}. Fix: use another "
                                "--out folder.")
    write_json(path, {"format": FORMAT, "name": spec.name, "title": spec.title, "notes": spec.notes,
                      "runs": [{"name": c.name, "row": c.row.label, "column": c.column.label, "seed": c.seed,
                                "config": c.config.to_record()} for c in study_cells]})


def status(cell: Cell, out: str | os.PathLike) -> tuple[str, int]:
    """``("done" | "failed" | "partial" | "new", epochs finished)`` of a cell's run directory."""
    run = RunDir(Path(out) / "runs" / cell.name)
    epochs = len(run.read_metrics())
    summary = run.read_summary()
    if summary is not None and summary["config"]["epochs"] == cell.config.epochs:
        return "done", epochs
    if (run.path / "failed.json").is_file():
        return "failed", epochs
    return ("partial" if epochs or run.checkpoint.is_file() else "new"), epochs


def _steps(config: TrainConfig) -> int:
    size = _SHIPPED if config.dataset == "cifar10" and config.data_dir is None else _DATA[config.dataset][0]
    size = min(config.limit or size, size)
    return config.epochs * num_batches(size, config.batch_size, drop_last=True)


def _signature(config: TrainConfig) -> str:
    keys = ("width", "blocks", "heads", "head_width", "target", "guess", "space", "granularity", "tangents",
            "aggregation", "per_sample", "engine", "streams", "recompute", "dataset", "batch_size", "compile")
    flat = config.to_dict()
    return json.dumps({k: flat[k] for k in keys} | {"device": str(resolve_device(config.device))})


def estimate(spec: StudySpec, out: str | os.PathLike, *, data_dir: str | None = None, device: str = "auto",
             threads: int | None = None, log: Callable[[str], None] = print) -> float:
    """List the runs with their status and estimated time; return the estimated seconds still to run.

    Step times are measured once per distinct model, method and batch size on this machine (one
    step after a warm-up step, on random data), cached in ``DIR/step_times.json``, or taken from
    runs that have already recorded theirs.
    """
    study_cells = cells(spec, data_dir=data_dir, device=device, threads=threads)
    out = Path(out)
    cache_path = out / "step_times.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for cell in study_cells:  # finished runs know their step time
        summary = RunDir(out / "runs" / cell.name).summary
        if summary.is_file():
            cache.setdefault(_signature(cell.config), json.loads(summary.read_text())["seconds_per_step"])
    total, lines = 0.0, []
    for cell in study_cells:
        key = _signature(cell.config)
        if key not in cache:
            cache[key] = _measure(cell.config)
            write_json(cache_path, cache)
        state, done = status(cell, out)
        remaining = 0 if state == "done" else _steps(cell.config) * (1 - done / cell.config.epochs)
        seconds = remaining * cache[key]
        total += seconds
        lines.append(f"{cell.name:<58} {state:>7} {done:>3}/{cell.config.epochs:<3} {cell.config.method.engine:>9} "
                     f"{cache[key] * 1000:>8.0f} {seconds / 3600:>8.2f}")
    log(f"{'run':<58} {'status':>7} {'epochs':>7} {'engine':>9} {'ms/step':>8} {'hours':>8}")
    for line in lines:
        log(line)
    log(f"{len(study_cells)} runs; estimated {total / 3600:.2f} h to run on {resolve_device(device)} "
        f"(step times measured here; evaluation adds about 10%).")
    return total


def _measure(config: TrainConfig) -> float:
    """Seconds of one training step of ``config``'s model and method, on random data."""
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    _, shape, classes = _DATA[config.dataset]
    converted = build(config, shape, classes).to(device)
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=1e-3), compile=config.compile,
                                distributed=False)  # one process's step time
    x, y = torch.randn(config.batch_size, *shape, device=device), torch.randint(0, classes, (config.batch_size,),
                                                                                  device=device)
    step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tick = time.perf_counter()
    step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tick
