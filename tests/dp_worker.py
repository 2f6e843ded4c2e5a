"""One rank of the data-parallel tests (``tests/test_distributed.py``), run as its own process:

    python tests/dp_worker.py CASE RANK WORLD PORT OUT

joins a gloo group on 127.0.0.1:PORT, runs CASE and writes what the test compares to OUT/CASE.RANK.pt.
The cases train on ``split(RANK)`` of fixed batches what :func:`train` trains on the whole batches in one
process (``distributed=False``), so the test can compare the two.

    python tests/dp_worker.py app ARGS...

runs ``fwdtrans ARGS...`` (under torchrun or alone), watched: see :func:`app`.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from models import Generated  # noqa: E402

import fwdtrans  # noqa: E402
from fwdtrans import _distributed  # noqa: E402

STEPS = 2
BATCH = 8
# name -> (method, norm, convert's sync_batchnorm)
CASES: dict[str, tuple[dict, str, bool]] = {
    "flagship": (dict(target="global", guess="local", space="activity"), "gn", False),
    "weight-tensor": (dict(target="global", guess="local", space="weight", granularity="tensor"), "gn", False),
    "weight-tensor-reference": (dict(target="global", guess="local", space="weight", granularity="tensor",
                                     engine="reference"), "gn", False),
    "gaussian-activity": (dict(target="global", guess="gaussian", space="activity", tangents=2), "gn", False),
    "rademacher-weight-joint": (dict(target="global", guess="rademacher", space="weight", granularity="joint"),
                                "gn", False),
    "ntk-intermediate": (dict(target="intermediate", guess="ntk", space="activity"), "gn", False),
    "backprop": (dict(target="global", guess="global"), "gn", False),
    "local-learning": (dict(target="local", guess="local"), "gn", False),
    "persample-weight": (dict(target="global", guess="local", space="weight", granularity="sample",
                              engine="reference"), "gn", False),
    "exact-activity": (dict(target="global", guess="local", space="activity", per_sample="exact"), "gn", False),
    "sync-backprop": (dict(target="global", guess="global"), "bn", True),
    "sync-flagship": (dict(target="global", guess="local", space="activity"), "bn", True),
    "sync-weight-tensor": (dict(target="global", guess="local", space="weight", granularity="tensor"), "bn", True),
    "sync-weight-reference": (dict(target="global", guess="gaussian", space="weight", granularity="block",
                                   engine="reference"), "bn", True),
}
# compiled steps (no normalisation: torch 2.13 cannot compile a GroupNorm whose input carries a tangent)
COMPILED: dict[str, tuple[dict, str, bool]] = {
    "compiled-flagship": (dict(target="global", guess="local", space="activity"), "none", False),
    "compiled-weight-tensor": (dict(target="global", guess="local", space="weight", granularity="tensor"), "none",
                               False),
}
# BatchNorm normalising each rank's share (the default): not one process's step, but the same on every rank
PER_RANK: dict[str, tuple[dict, str, bool]] = {
    "bn-per-rank": (dict(target="global", guess="local", space="weight", granularity="block"), "bn", False),
}
UNEVEN = {"flagship-uneven": "flagship", "gaussian-uneven": "gaussian-activity"}  # 5 + 3 samples
SMALL_BUCKETS = {"flagship-buckets"}  # a bucket per parameter tensor or so: the overlapped path


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def split(rank: int, world: int, uneven: bool) -> slice:
    if uneven:
        return slice(0, 5) if rank == 0 else slice(5, 8)
    return slice(BATCH * rank // world, BATCH * (rank + 1) // world)


def build(name: str) -> fwdtrans.Converted:
    method, norm, sync = {**CASES, **COMPILED, **PER_RANK}[name]
    torch.manual_seed(0)
    model = Generated("cnn", [4, 4, 4], norm, 3, 2).double()
    # GroupNorm models get heads without BatchNorm (fwdtrans's linear head starts with one): nothing couples samples
    heads = "linear" if norm == "bn" else (lambda shape: nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 3)))
    return fwdtrans.convert(model, torch.zeros(2, 2, 6, 6, dtype=torch.float64), blocks=3, heads=heads,
                            sync_batchnorm=sync, **method)


def train(name: str, rank: int = 0, world: int = 1, *, compile=False, uneven: bool = False, **step_options) -> dict:
    """``STEPS`` SGD steps (momentum) of case ``name`` on this rank's share of the batches."""
    converted = build(name)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    step = converted.train_step(optimizer, compile=compile, **step_options)
    history = []
    for s in range(STEPS):
        x, y = data(s)
        part = split(rank, world, uneven) if world > 1 else slice(None)
        history.append({k: float(v) for k, v in step(x[part], y[part]).items()})
    return {"state": {k: v.detach().clone() for k, v in converted.state_dict().items()}, "metrics": history,
            "generator": converted.generator.get_state()}


def refused() -> dict[str, str]:
    """What synchronised BatchNorm refuses, by label: the error's message."""
    errors = {}
    for label, method in {"compile": None, "exact": fwdtrans.Method(per_sample="exact"),
                          "span": fwdtrans.Method(space="span")}.items():
        converted = build("sync-flagship")
        if method is not None:
            converted.method = method
        try:
            converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1), compile=method is None)
        except fwdtrans.FwdTransError as e:
            errors[label] = str(e)
    return errors


def run(case: str, rank: int, world: int, timeout: float) -> dict:
    if case == "equivalence":
        result = {name: train(name, rank, world) for name in CASES}
        result.update({name: train(base, rank, world, uneven=True) for name, base in UNEVEN.items()})
        result.update({name: train(name, rank, world) for name in PER_RANK})
        _distributed.BUCKET_BYTES = 256  # many buckets, sent while the engine goes on
        result["flagship-buckets"] = train("flagship", rank, world)
        result["refused"] = refused()
        return result
    if case == "compiled":
        return {name: train(name, rank, world, compile={"backend": "aot_eager"}) for name in COMPILED}
    if case in ("raises", "stalls"):
        converted = build("flagship")
        calls = [0]

        def guess(j, h, y):  # rank 1 fails in the middle of its second step (block 0 of 2)
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                raise ValueError("rank 1 failed on purpose")
            return torch.ones_like(h)

        converted.method = fwdtrans.Method(guess=guess)
        step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
        start = time.monotonic()
        try:
            for s in range(STEPS):
                x, y = data(s)
                step(x[split(rank, world, False)], y[split(rank, world, False)])
        except fwdtrans.FwdTransError as e:
            return {"error": str(e), "type": type(e).__name__, "seconds": time.monotonic() - start}
        except ValueError as e:
            if case == "stalls":  # alive, but never answers again: the others must time out, not hang
                time.sleep(3 * timeout)
            return {"error": str(e), "type": type(e).__name__}
        return {}
    raise SystemExit(f"unknown case {case}")


def main(case: str, rank: int, world: int, port: int, out: str) -> int:
    timeout = float(os.environ.get("DP_TIMEOUT", "60"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    result = run(case, rank, world, timeout)
    torch.save(result, Path(out) / f"{case}.{rank}.pt")
    if "error" in result:
        return 3
    dist.destroy_process_group()
    return 0


def app(argv: list[str]) -> int:
    """``fwdtrans ARGV``, watched through environment variables: ``DP_RECORD=FOLDER`` (required) makes this
    process append the labels of each batch it steps on to ``FOLDER/TAG.RANK.labels`` (a JSON list a line) and
    list in ``FOLDER/TAG.RANK.writes`` every file or folder it creates, writes, renames or removes under
    ``DP_WATCH`` (Python's audit events); ``DP_TAG`` names the launch; ``DP_DIE=STEP`` ends rank 1 (or the
    only process) abruptly (``os._exit``) before its step number ``STEP`` (from 0)."""
    from fwdtrans.app import main as fwdtrans_main

    folder, tag, rank = Path(os.environ["DP_RECORD"]), os.environ.get("DP_TAG", "run"), os.environ.get("RANK", "0")
    watched, die = os.environ.get("DP_WATCH"), os.environ.get("DP_DIE")
    dies = die is not None and rank == ("1" if os.environ.get("WORLD_SIZE", "1") != "1" else "0")
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            paths = args[:1] if _writes(args) else ()
        else:
            paths = {"os.rename": args[:2], "os.mkdir": args[:1], "os.remove": args[:1], "os.rmdir": args[:1]}.get(
                event, ())
        writes.extend(f"{event} {p}" for p in map(os.fsdecode, (p for p in paths if isinstance(p, (str, Path))))
                      if watched and (p == watched or p.startswith(watched.rstrip("/") + "/")))

    def save() -> None:
        (folder / f"{tag}.{rank}.writes").write_text(json.dumps(writes))

    original, taken = fwdtrans.Converted.train_step, [0]

    def train_step(self, optimizer, **kwargs):
        step = original(self, optimizer, **kwargs)

        def watched_step(x, y):
            if dies and taken[0] == int(die):
                os._exit(9)
            taken[0] += 1
            with open(folder / f"{tag}.{rank}.labels", "a") as f:
                f.write(json.dumps(y.tolist()) + "\n")
            return step(x, y)
        return watched_step

    fwdtrans.Converted.train_step = train_step
    atexit.register(save)
    sys.addaudithook(audit)
    return fwdtrans_main(argv)


def _writes(args: tuple) -> bool:
    """Whether an ``open`` audit event opens for writing (``open()``'s mode, or ``os.open``'s flags)."""
    _, mode, flags = args
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "app":
        sys.exit(app(sys.argv[2:]))
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
