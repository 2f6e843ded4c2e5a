"""Data-parallel step time: fwdtrans' reductions against DDP's backprop, in the same run, under torchrun.

Usage:
    torchrun --nproc-per-node 2 bench/distributed.py [--width 16] [--batch 64] [--steps 7] [--json OUT]

Every rank takes ``--batch / N`` samples of the same global batch (ResNet-18, the paper's 8 blocks, CNN heads,
one thread per rank). Cases: ``ddp-backprop`` (the unconverted model in ``DistributedDataParallel``,
``cross_entropy(...).backward()``), then fwdtrans' ``backprop``, ``flagship`` (global target, local guess,
activity) and ``weight-tensor`` (weight space per tensor, reference engine), each stepping with its own
reductions (``train_step``). Per case, the median over ``--steps`` interleaved rounds after a warm-up of the
slowest rank's time, and its ratio to ``ddp-backprop``; rank 0 prints the table (and writes ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fwdtrans

METHODS = {
    "backprop": dict(guess="global"),
    "flagship": dict(target="global", guess="local", space="activity"),
    "weight-tensor": dict(target="global", guess="local", space="weight", granularity="tensor", engine="reference"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="the global batch")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    share = slice(args.batch * rank // world, args.batch * (rank + 1) // world)
    x, y = x[share], y[share]
    model = fwdtrans.models.resnet18(width=args.width)
    ddp = DistributedDataParallel(fwdtrans.models.resnet18(width=args.width))
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)

    def ddp_step() -> None:
        ddp_opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        ddp_opt.step()

    steps = {"ddp-backprop": ddp_step}
    for name, method in METHODS.items():
        converted = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), heads="cnn", **method)
        step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=1e-3))
        steps[name] = lambda step=step: step(x, y)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.steps + 1):
        for name, fn in steps.items():
            dist.barrier()
            tick = time.perf_counter()
            fn()
            slowest = torch.tensor([time.perf_counter() - tick])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if r:  # the first round warms up
                times[name].append(float(slowest))
    if rank == 0:
        base = statistics.median(times["ddp-backprop"])
        rows = [{"case": k, "ms": 1000 * statistics.median(v), "ratio": statistics.median(v) / base}
                for k, v in times.items()]
        print(f"{world} ranks, ResNet-18 width {args.width}, global batch {args.batch}, 1 thread per rank")
        for row in rows:
            print(f"{row['case']:<14} {row['ms']:8.0f} ms  {row['ratio']:.2f}x DDP backprop")
        if args.json:
            config = {"ranks": world, "width": args.width, "batch": args.batch, "steps": args.steps,
                      "torch": torch.__version__, "load": os.getloadavg()[0]}
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:  # atomically: the whole file or the old one
                json.dump({"config": config, "rows": rows}, f, indent=1)
            os.replace(tmp, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
