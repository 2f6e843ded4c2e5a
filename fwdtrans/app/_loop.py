"""The training loop behind ``fwdtrans train``: a run that survives a crash and resumes bit for bit.

``train(config, run_dir=...)`` builds the paper's ResNet-18 for the data set, converts it with the
config's method, and trains it epoch by epoch. With a run directory (``_rundir``) it writes a
checkpoint at the end of every epoch (and every ``checkpoint_every`` steps), then the epoch's
metrics line; started again with the same directory it resumes from the checkpoint and ends with
the per-epoch metrics of an uninterrupted run. Everything random is either restored from the
checkpoint (model init, noise guesses, NTK heads, dropout) or a pure function of the seed and the
epoch (data order and augmentation, ``_batches``).
"""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

import fwdtrans

from .._errors import FwdTransError
from ..models import resnet18
from ._batches import batches, epoch_generator, num_batches
from ._config import EXECUTION_KEYS, TrainConfig
from ._datasets import ImageDataset, load_dataset
from ._group import World, join_group, leave_group, resolve_device
from ._probe import probe
from ._rundir import FORMAT, RunDir, deferred_interrupts, load_checkpoint, save_checkpoint, save_torch, write_json
from ._schedule import lr_factor

__all__ = ["build", "evaluate", "train"]


@torch.no_grad()
def evaluate(converted: fwdtrans.Converted, x: torch.Tensor, y: torch.Tensor, mean, std, *, heads: bool = False,
             batch_size: int = 500, world: World | None = None) -> dict[str, float]:
    """Test loss and top-1 accuracy of ``converted`` in eval mode (and each head's loss with
    ``heads``) on uint8 images ``x``; restores the training flag. With a ``world`` of several ranks,
    each rank evaluates its contiguous share of the images and the sums are added over the ranks."""
    was_training = converted.training
    converted.eval()
    last = len(converted.blocks) - 1
    total = len(y)
    if world is not None and world.group is not None:
        share = slice(total * world.rank // world.size, total * (world.rank + 1) // world.size)
        x, y = x[share], y[share]
    sums = {"test_loss": 0.0, "test_accuracy": 0.0, **{f"test_loss/head{j}": 0.0 for j in range(last) if heads}}
    for xb, yb in batches(x, y, batch_size, mean=mean, std=std, shuffle=False, augment=False) if len(y) else ():
        h = (xb,)
        for j, block in enumerate(converted.blocks):
            h = (block(*h),)
            if heads and j < last:
                sums[f"test_loss/head{j}"] += float(F.cross_entropy(converted.heads[j](*h), yb, reduction="sum"))
        sums["test_loss"] += float(F.cross_entropy(h[0], yb, reduction="sum"))
        sums["test_accuracy"] += float((h[0].argmax(-1) == yb).sum())
    converted.train(was_training)
    if world is not None and world.group is not None:
        sums = world.sum(sums)
    return {k: v / max(total, 1) for k, v in sums.items()}


def build(config: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> fwdtrans.Converted:
    """The paper's ResNet-18 for images of ``image_shape`` (C, H, W), converted with ``config``'s method.

    8 blocks are one residual block each, 16 blocks one layer each, without skip connections (the
    paper's two settings); other counts balance FLOPs.
    """
    model = resnet18(num_classes=num_classes, width=config.width, skip=config.blocks != 16,
                     in_channels=image_shape[0])
    blocks = model.paper_cuts() if config.blocks in (8, 16) else config.blocks
    example = torch.zeros(2, *image_shape)
    try:
        return fwdtrans.convert(model, example, blocks=blocks, heads=config.head_spec(), seed=config.seed,
                                method=config.method)
    except FwdTransError:
        most = len(fwdtrans.inspect(model, example).points) + 1
        if config.blocks <= most:
            raise
        raise FwdTransError(f"blocks={config.blocks}: the ResNet-18 has {most - 1} places to cut, so at most {most} "
                            f"blocks. Fix: --blocks {most} or fewer (blocks={most} in a TrainConfig); 8 and 16 are "
                            "the paper's cuts.") from None


def _rng_state(converted) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": converted.generator.get_state(),
             "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(converted, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    converted.generator.set_state(state["generator"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _versions() -> dict:
    return {"fwdtrans": fwdtrans.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _data_identity(data: ImageDataset, train_size: int) -> dict:
    return {"name": data.name, "train": train_size, "test": len(data.test_y), "classes": data.num_classes,
            "shape": list(data.image_shape)}


def _check_resumable(recorded: dict, config: TrainConfig, data: dict, run: RunDir) -> None:
    """Refuse to resume a run directory recorded with other settings, naming the differing keys."""
    if recorded.get("format") != FORMAT:
        raise FwdTransError(f"{run.config} has format {recorded.get('format')!r}; this fwdtrans writes format "
                            f"{FORMAT}. Fix: start the run in a new --run-dir.")
    old, new = recorded["config"], config.to_dict()
    differing = sorted(k for k in old.keys() | new.keys() if k not in EXECUTION_KEYS and old.get(k) != new.get(k))
    if recorded.get("data") != data:
        differing.append("data")
    if differing:
        details = "; ".join(f"{k}: recorded {old.get(k, recorded.get(k))!r}, now {new.get(k, data)!r}"
                            for k in differing)
        raise FwdTransError(f"{run.path} holds a run with other settings ({details}). Only {', '.join(EXECUTION_KEYS)} "
                            "may change when a run resumes. Fix: repeat the recorded settings (see its config.json), "
                            "or use a new --run-dir.")


class _Epoch:
    """Running sums of one epoch's per-step metrics (saved in mid-epoch checkpoints)."""

    def __init__(self, sums: dict | None = None):
        self.sums: dict[str, list[float]] = sums or {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            total = self.sums.setdefault(k, [0.0, 0])
            total[0] += v
            total[1] += 1

    def means(self) -> dict[str, float]:
        return {k: s / n for k, (s, n) in self.sums.items()}


class _Clock:
    """A run's wall time, its current epoch's and its step times, carried over interruptions in the checkpoint
    (an interrupted epoch's ``seconds`` count its every part). The first step of each start pays one-off costs
    (with ``compile``: the compilation): the run's first is reported on its own, the others left out."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        now = time.perf_counter()
        self.began, self.epoch_began = now - saved.get("run", 0.0), now - saved.get("epoch", 0.0)
        self.first: float | None = saved.get("first")
        self.steps: list = list(saved.get("steps", [0.0, 0]))  # seconds and count of the steps timed
        self.fresh = True  # the next step is this start's first

    def add_step(self, seconds: float) -> None:
        if self.fresh:
            self.fresh, self.first = False, seconds if self.first is None else self.first
        else:
            self.steps = [self.steps[0] + seconds, self.steps[1] + 1]

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_began

    def run_seconds(self) -> float:
        return time.perf_counter() - self.began

    def next_epoch(self) -> None:
        self.epoch_began = time.perf_counter()

    def per_step(self) -> float | None:
        return self.steps[0] / self.steps[1] if self.steps[1] else self.first

    def state(self, mid_epoch: bool) -> dict:
        return {"run": self.run_seconds(), "epoch": self.epoch_seconds() if mid_epoch else 0.0, "first": self.first,
                "steps": self.steps}


def train(config: TrainConfig, *, run_dir: str | None = None, progress: Callable | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Train with ``config``; return the summary (also written to ``run_dir/summary.json``).

    With ``run_dir``, the run is checkpointed and resumable (see the module docstring); a finished
    run is not trained again (its summary is returned; a larger ``epochs`` extends it).
    ``progress`` wraps each epoch's batch iterator (e.g. ``functools.partial(tqdm, ...)``); ``log``
    receives the data set and steps per epoch, where a run resumes, one line per epoch, and without
    ``progress`` a line every ``config.log_every`` seconds.

    Under ``torchrun`` (see :func:`join_group`) every rank trains on its contiguous share of each batch of
    the same epoch plan; rank 0 alone writes the run directory, logs and shows progress; every rank loads
    the checkpoint, and evaluation is split over the ranks.

    Example:
        >>> summary = train(TrainConfig(width=2, blocks=2, heads="linear", epochs=1, limit=64,
        ...                             batch_size=32))
        >>> [e["epoch"] for e in summary["epochs"]]
        [1]
    """
    config = config.validate()
    world, device = join_group(resolve_device(config.device), config.dist_timeout)
    if not world.main:
        progress = log = None
    run = RunDir(run_dir) if run_dir is not None else None
    if run is None:
        summary = _train(config, None, progress, log, world, device)
        leave_group(world)
        return summary
    problem = None
    if world.main:  # rank 0 alone writes (and locks) the run directory
        try:
            run.prepare()
        except FwdTransError as e:
            problem = e
    world.agree(problem, "to open the run directory")
    try:
        summary = _train(config, run, progress, log, world, device)
    finally:
        run.release()
    leave_group(world)
    return summary


def _train(config: TrainConfig, run: RunDir | None, progress: Callable | None,
           log: Callable[[str], None] | None, world: World, device: torch.device) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_dataset(config.dataset, config.data_dir)
    train_size = min(config.limit or len(data.train_y), len(data.train_y))
    if config.batch_size > train_size:
        raise FwdTransError(f"batch_size={config.batch_size} is larger than the {train_size} training images. "
                            "Fix: lower --batch-size or raise --limit.")
    if config.batch_size < world.size:
        raise FwdTransError(f"batch_size={config.batch_size} is smaller than the {world.size} ranks sharing each "
                            "batch. Fix: raise --batch-size (the global batch), or run fewer ranks.")
    identity = _data_identity(data, train_size)
    recorded = run.read_config() if run is not None else None
    if recorded is not None:
        _check_resumable(recorded, config, identity, run)
        done = run.read_summary()
        if done is not None and done["config"]["epochs"] == config.epochs:  # finished: nothing to train
            return done
    if run is not None and run.leftovers():
        names = ", ".join(run.leftovers())
        raise FwdTransError(f"{run.path} holds {names} of trained epochs but no {run.checkpoint.name} to resume "
                            f"from. Fix: restore {run.checkpoint.name}, or delete {names} and config.json to start the "
                            "run over, or use a new --run-dir.")
    checkpoint = load_checkpoint(run.checkpoint) if run is not None and run.checkpoint.is_file() else None
    per_epoch = num_batches(train_size, config.batch_size, drop_last=True)
    say = log or (lambda line: None)
    of = f" (of {len(data.train_y)})" if train_size < len(data.train_y) else ""
    say(f"data: {data.name}, {train_size} training images{of}, {len(data.test_y)} test images; {per_epoch} steps of "
        f"{config.batch_size} per epoch")

    torch.manual_seed(config.seed)
    converted = build(config, data.image_shape, data.num_classes).to(device)
    train_x, train_y = data.train_x[:train_size].to(device), data.train_y[:train_size].to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    optimizer = torch.optim.SGD(converted.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    epoch, start, step, history, running, clock = 0, 0, 0, [], _Epoch(), _Clock()
    if checkpoint is not None:
        converted.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(converted, checkpoint["rng"])
        epoch, start, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        history = checkpoint["history"]
        running = _Epoch(checkpoint["sums"])
        clock = _Clock(checkpoint.get("timing"))
        if epoch < config.epochs:
            say(f"resuming {run.path} at epoch {epoch + 1}/{config.epochs}, step {start + 1}/{per_epoch} "
                f"({run.checkpoint.name} after {step} steps)")
    if epoch > config.epochs:
        raise FwdTransError(f"{run.path} has already trained {epoch} epochs; epochs={config.epochs} cannot shrink it. "
                            f"Fix: pass --epochs {epoch} or more.")
    world.barrier("after reading the run directory")  # every rank has read it before rank 0 writes to it
    method = converted.method
    segment = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
               "threads": torch.get_num_threads(), "compile": config.compile, "epochs": config.epochs,
               "ranks": world.size, "start_epoch": epoch, "start_step": step, "versions": _versions()}
    if run is not None and world.main:
        write_json(run.config, {"format": FORMAT, "config": config.to_record(), "data": identity,
                                "method": method.to_dict(), "cuts": list(converted.cut_names),
                                "segments": [*(recorded or {}).get("segments", []), segment]})
        run.rewrite_metrics(history)  # exactly the epochs the checkpoint holds
    writer = _tensorboard(run) if config.tensorboard and run is not None and world.main else None

    def save(batch: int) -> None:  # rank 0's: every rank holds the same state
        if not world.main:
            return
        save_checkpoint(run.checkpoint, {"format": FORMAT, "epoch": epoch, "batch": batch, "step": step,
                                         "model": converted.state_dict(), "optimizer": optimizer.state_dict(),
                                         "rng": _rng_state(converted), "sums": running.sums, "history": history,
                                         "timing": clock.state(mid_epoch=batch > 0)})

    step_fn = converted.train_step(optimizer, compile=config.compile, sync_batchnorm=config.sync_batchnorm)
    last_line = time.perf_counter()
    lines = log is not None and progress is None and config.log_every > 0  # no bar: a line every log_every seconds
    while epoch < config.epochs:
        converted.train()
        it = batches(train_x, train_y, config.batch_size, mean=data.mean, std=data.std, shuffle=True,
                     augment=config.augment and data.augment, generator=epoch_generator(config.seed, epoch),
                     drop_last=True, start=start, shard=(world.rank, world.size))
        if progress is not None:
            it = progress(it, total=per_epoch, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}")
        for batch, (xb, yb) in enumerate(it, start):
            lr = config.lr * lr_factor(config.schedule, step, per_epoch, config.epochs, config.step_size,
                                       config.gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            diagnostics = {}
            if config.diagnostics_every and step % config.diagnostics_every == 0:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    diagnostics = world.mean(fwdtrans.check(converted, (xb, yb)).metrics())
            t0 = time.perf_counter()
            metrics = step_fn(xb, yb)
            values = {f"train_{k}": float(v) for k, v in metrics.items()}  # train_loss, train_loss/head0, ...
            clock.add_step(time.perf_counter() - t0)
            running.add({**values, **diagnostics})
            step += 1
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{values['train_loss']:.3f}", lr=f"{lr:.3g}")
            if lines and time.perf_counter() - last_line >= config.log_every:
                last_line = time.perf_counter()
                say(f"epoch {epoch + 1}/{config.epochs}: step {batch + 1}/{per_epoch}  train loss "
                    f"{running.means()['train_loss']:.4f}  lr {lr:.3g}  ({clock.epoch_seconds():.0f} s)")
            if run is not None and config.checkpoint_every and step % config.checkpoint_every == 0 \
                    and batch + 1 < per_epoch:
                with deferred_interrupts():
                    save(batch + 1)
        tested = evaluate(converted, test_x, test_y, data.mean, data.std, heads=method.trains_heads, world=world)
        epoch += 1
        record = {"epoch": epoch, "step": step, "lr": lr, **running.means(), **tested,
                  "seconds": clock.epoch_seconds()}
        history.append(record)
        clock.next_epoch()
        start, running = 0, _Epoch()
        if run is not None and world.main:
            with deferred_interrupts():  # the checkpoint holds the epoch before metrics.jsonl does
                save(0)
                run.append_metrics(record)
        if writer is not None:
            for k, v in record.items():
                if k != "epoch":
                    writer.add_scalar(k, v, epoch)
            writer.flush()
        say(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}  test loss "
            f"{record['test_loss']:.4f}  test accuracy {record['test_accuracy']:.2%}  ({record['seconds']:.0f} s)")
    if writer is not None:
        writer.close()
    probes = probe(converted, config, data, (train_x, train_y), (test_x, test_y)) \
        if config.probe_epochs and world.main else {}  # rank 0's, on the whole data
    summary = {
        "config": config.to_record(),
        "method": method.to_dict(),
        "cuts": list(converted.cut_names),
        "data": identity,
        "epochs": history,
        "test_accuracy": history[-1]["test_accuracy"],
        "probes": probes,
        "first_step_seconds": clock.first,
        "seconds_per_step": clock.per_step(),
        "seconds": clock.run_seconds(),
        "device": str(device),
        "ranks": world.size,
        "versions": _versions(),
    }
    if run is not None and world.main:
        save_torch(run.model, converted.original_state_dict())
        write_json(run.summary, summary)
    return summary


def _tensorboard(run: RunDir):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.path / "tensorboard"))
