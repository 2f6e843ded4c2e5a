"""Peak memory of one training step per method, each case in a fresh process, as a ratio to backprop.

Usage:
    python bench/memory.py [--width 16] [--batch 128] [--blocks 16] [--json OUT]

CPU: the process's peak resident set (``ru_maxrss``) during two steps, minus the resident set after
the model, the conversion and the batch were built. CUDA (``--device cuda``): the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CASES = {
    "backprop": {"target": "global", "guess": "global"},
    "flagship": {"target": "global", "guess": "local", "space": "activity"},
    "flagship-sequential": {"target": "global", "guess": "local", "space": "activity", "streams": "sequential"},
    "activity-joint": {"target": "global", "guess": "local", "space": "activity", "streams": "joint"},
    "weight-block": {"target": "global", "guess": "local", "space": "weight", "granularity": "block"},
    "weight-joint": {"target": "global", "guess": "local", "space": "weight", "granularity": "joint"},
    "local": {"target": "local", "guess": "local"},
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.width, args.batch, args.blocks, args.device)))
        return
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--width", str(args.width), "--batch",
                              str(args.batch), "--blocks", str(args.blocks), "--device", args.device],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next(r["peak_bytes"] for r in rows if r["case"] == "backprop")
    print(f"ResNet-18 width {args.width}, batch {args.batch}, {args.blocks} blocks, {args.device}")
    print(f"{'case':<22} {'peak MiB':>9} {'/ backprop':>10}")
    for r in rows:
        r["ratio"] = r["peak_bytes"] / base
        print(f"{r['case']:<22} {r['peak_bytes'] / 2**20:>9.1f} {r['ratio']:>10.2f}")
    if args.json:
        from fwdtrans._train import write_json

        write_json(args.json, {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
