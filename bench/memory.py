"""Peak memory of one training step per method, each case in a fresh process, as a ratio to backprop.

Usage:
    python bench/memory.py [--width 16] [--batch 128] [--blocks 16] [--device cpu|cuda] [--cases ...] [--json OUT]

CPU: the process's peak resident set (``ru_maxrss``) during two steps, minus the resident set after
the model, the conversion and the batch were built. Children run with glibc's
``MALLOC_MMAP_THRESHOLD_=131072``: every tensor of 128 KiB or more gets its own mapping, returned to
the system when freed. Without it glibc raises the threshold as tensors are freed and keeps freed
heap memory, and the resident set measures the allocator's history more than the step's live memory
(measured here: backprop 333 MiB instead of 187 MiB, and the ratios change with it). CUDA (``--device cuda``):
the allocator's peak.
A case that fails (e.g. ``flagship-recompute`` before ``convert(..., recompute=True)`` exists) is
reported with its error; the others still run. ``--json`` writes the configuration, torch version,
device, date and rows atomically (``bench/make_page.py --memory`` turns it into a table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys

CASES = {
    "backprop": {"target": "global", "guess": "global"},
    "flagship": {"target": "global", "guess": "local", "space": "activity"},
    "flagship-sequential": {"target": "global", "guess": "local", "space": "activity", "streams": "sequential"},
    "activity-joint": {"target": "global", "guess": "local", "space": "activity", "streams": "joint"},
    "weight-block": {"target": "global", "guess": "local", "space": "weight", "granularity": "block"},
    "weight-block-sequential": {"target": "global", "guess": "local", "space": "weight", "granularity": "block",
                                "streams": "sequential"},
    "weight-joint": {"target": "global", "guess": "local", "space": "weight", "granularity": "joint"},
    # the official code's per-sample weight space, with the engine it trains with
    "weight-sample": {"target": "global", "guess": "local", "space": "weight", "granularity": "sample",
                      "engine": "reference"},
    "local": {"target": "local", "guess": "local"},
    # convert(..., recompute=True): activity-space recomputation of the block forwards
    "flagship-recompute": {"target": "global", "guess": "local", "space": "activity", "recompute": True},
}


def _child(case: str, width: int, batch: int, blocks: int, device: str) -> dict:
    import torch

    import fwdtrans

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = fwdtrans.models.resnet18(width=width, skip=blocks != 16).to(device)
    cuts = model.paper_cuts() if blocks in (8, 16) else blocks
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    converted = fwdtrans.convert(model, x[:2], blocks=cuts, **CASES[case])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    for _ in range(2):
        converted.compute_gradients(x, y)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"case": case, "peak_bytes": peak}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, metavar="CASE",
                        help=f"default: all of {', '.join(CASES)}")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.width, args.batch, args.blocks, args.device)))
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)")
    rows = []
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--width", str(args.width), "--batch",
                              str(args.batch), "--blocks", str(args.blocks), "--device", args.device],
                             check=False, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        if out.returncode:
            rows.append({"case": case, "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r["peak_bytes"] for r in rows if r["case"] == "backprop" and "peak_bytes" in r), None)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"ResNet-18 width {args.width}, batch {args.batch}, {args.blocks} blocks, {device}")
    print(f"{'case':<22} {'peak MiB':>9} {'/ backprop':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<22} failed: {r['error']}")
            continue
        r["ratio"] = r["peak_bytes"] / base if base else None
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['case']:<22} {r['peak_bytes'] / 2**20:>9.1f} {ratio:>10}")
    if args.json:
        from fwdtrans.app._rundir import write_json

        config = {k: getattr(args, k) for k in ("width", "batch", "blocks", "device", "cases")}
        write_json(args.json, {"config": config, "torch": torch.__version__, "device_name": device,
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "rows": rows})


if __name__ == "__main__":
    main()
