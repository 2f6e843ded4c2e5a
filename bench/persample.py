"""The per-sample weight-space estimate (``fwdtrans._persample``) against a backprop step: time and peak memory.

Usage:
    python bench/persample.py [--width 64] [--batch 128] [--rounds 3] [--threads 1] [--chunk N] [--json OUT]
    python bench/persample.py --width 16 --batch 32        # the quick check (about a minute on 2 cores)

The model is the paper's CIFAR ResNet-18 (``fwdtrans.models.resnet18(width)``) cut into its 8 blocks
(``blocks=model.paper_cuts()``), with the default heads, in train mode. The cases, on the same batch:

* ``plain-backprop``: ``F.cross_entropy(model(x), y).backward()`` on the original model (eager autograd);
* ``backprop``: fwdtrans's own backprop (``target="global", guess="global"``, ``compute_gradients``), the
  baseline of the docs' performance pages;
* ``persample``: what the engine will run for the official code's default weight space, written
  out here with ``torch.func`` only: one forward sweep over the blocks (each block but the last
  through :func:`fwdtrans._persample.record`, keeping its pull-back to its input and to every layer's
  output gradient; each head's loss gradient, the local guess's cotangent, and its parameter
  gradients), the last block's exact gradient and the global loss's cotangent, then a walk back
  from the logits: for each block ``j = J-2..0``, :func:`fwdtrans._persample.project` with the
  target's cotangent at the block output (the global loss) and the guess's, which also returns the
  target's cotangent at the block input for block ``j - 1``.
* ``engine``: the same through the engine, ``convert(..., space="weight", granularity="sample",
  engine="reference")`` and ``compute_gradients`` (what ``fwdtrans train`` runs); the issue's targets
  are for this case;
* ``engine-forward`` (with ``--forward``): the engine's forward-mode version (``engine="forward"``), one
  tangent stream per sample and parameter tensor: far slower, measured to be documented.

Time: the median over ``--rounds`` interleaved rounds (after one warm-up of each), in this process,
of wall-clock time and of the process's CPU time (see :func:`timing`).
Memory (all three cases): each case in a fresh process, as in ``bench/memory.py``: the
peak resident set during two steps (the kernel's high-water mark, reset after a warm-up step) minus
the resident set before them, with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors
return to the system. ``persample`` and the engine's cases are given as ratios to each backprop. The issue's
targets (for ``engine``): time <= 2.2x, peak memory <= 1.5x. The process runs ``--threads`` threads (default 1:
run it with ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, vjp

import fwdtrans
from fwdtrans._persample import choices, project, record

TARGETS = {"time": 2.2, "memory": 1.5}
_MEASURED = ("persample", "engine", "engine-forward")  # the cases given as ratios to the backprops


def build(width: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = fwdtrans.models.resnet18(width=width)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    converted = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), target="global", guess="local",
                                 space="weight")
    model.train()
    converted.train()
    return model, converted, x, y


def engine_model(model, x, engine: str = "reference"):
    """The per-sample weight space through the engine (global target, local guess, the default heads)."""
    converted = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), target="global", guess="local",
                                 space="weight", granularity="sample", engine=engine)
    converted.train()
    return converted


def backprop_step(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _split(module):
    trained = {k: p for k, p in module.named_parameters() if p.requires_grad}
    frozen = {k: p for k, p in module.named_parameters() if not p.requires_grad}
    return trained, frozen, dict(module.named_buffers())


def persample_step(converted, x, y, chunk: int | None = None, phases: dict | None = None) -> dict:
    """Every gradient of one step: per-sample weight-space estimates for blocks 0..J-2, the exact
    gradient for the last block, the heads' local-loss gradients. ``phases`` receives seconds per phase."""
    clock = time.perf_counter
    blocks, heads = converted.blocks, converted.heads
    last = len(blocks) - 1
    grads: dict[str, torch.Tensor] = {}
    recs, guesses = [], []
    t0 = clock()
    with torch.no_grad():
        h = x
        for j in range(last):
            trained, _, buffers = _split(blocks[j])
            rec = record(blocks[j], trained, buffers, (h,), wrt_inputs=j > 0)
            head_p, _, head_b = _split(heads[j])

            def head_loss(o, p, head=heads[j], hb=head_b):
                return F.cross_entropy(functional_call(head, (p, {k: b.clone() for k, b in hb.items()}), (o,)), y)

            loss, pull = vjp(head_loss, rec.out, head_p)
            g, head_grads = pull(torch.ones_like(loss))
            del pull
            grads.update({f"heads.{j}.{k}": v for k, v in head_grads.items()})
            recs.append(rec)
            guesses.append(g)
            h = rec.out
        trained, _, buffers = _split(blocks[last])
        logits, pull = vjp(lambda p, xin: functional_call(blocks[last], (p, {k: b.clone() for k, b in buffers.items()}),
                                                          (xin,)), trained, h)
        loss, lpull = vjp(lambda o: F.cross_entropy(o, y), logits)
        (cot,) = lpull(torch.ones_like(loss))
        last_grads, cot = pull(cot)
        del pull, lpull, h
        grads.update({f"blocks.{last}.{k}": v for k, v in last_grads.items()})
        t1 = clock()
        for j in range(last - 1, -1, -1):
            est, inputs_cot = project(recs[j], cot, guesses[j], chunk=chunk)
            recs[j] = guesses[j] = None  # this block's activations are no longer needed
            grads.update({f"blocks.{j}.{k}": v for k, v in est.items()})
            cot = inputs_cot[0] if inputs_cot else None
        t2 = clock()
    if phases is not None:
        phases["sweep"] = phases.get("sweep", 0.0) + t1 - t0
        phases["walk"] = phases.get("walk", 0.0) + t2 - t1
    return grads


# ----------------------------------------------------------------------------- memory, one process per case
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(case: str, width: int, batch: int, threads: int, chunk: int | None) -> dict:
    torch.set_num_threads(threads)
    model, converted, x, y = build(width, batch)
    if case == "plain-backprop":
        step = lambda: backprop_step(model, x, y)  # noqa: E731
    elif case == "backprop":
        del converted
        engine_bp = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), target="global", guess="global")
        engine_bp.train()
        step = lambda: engine_bp.compute_gradients(x, y)  # noqa: E731
    elif case in ("engine", "engine-forward"):
        del converted
        engine = engine_model(model, x, "reference" if case == "engine" else "forward")
        step = lambda: engine.compute_gradients(x, y)  # noqa: E731
    else:
        step = lambda: persample_step(converted, x, y, chunk)  # noqa: E731
    step()  # warm-up: plans, shapes, allocator
    model.zero_grad(set_to_none=True)
    base = _rss()
    reset = _reset_hwm()
    for _ in range(2):
        grads = step()
        del grads
    peak = _hwm() if reset else __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "peak_bytes": peak - base, "hwm_reset": reset}


def memory(case: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--child", case, "--width", str(args.width), "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"case": case, "error": out.stderr.strip().splitlines()[-1] if out.stderr else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- time, in this process
def timing(args) -> dict:
    """Medians over interleaved rounds, of wall-clock and of this process's CPU time (with one thread
    the CPU time is the wall-clock time of an idle machine; on a shared one it leaves out the time
    the process waited for a core)."""
    torch.set_num_threads(args.threads)
    model, converted, x, y = build(args.width, args.batch)
    engine_bp = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), target="global", guess="global")
    engine_bp.train()
    phases: dict[str, float] = {}
    engine = engine_model(model, x)
    cases = {"plain-backprop": lambda: backprop_step(model, x, y),
             "backprop": lambda: engine_bp.compute_gradients(x, y),
             "persample": lambda: persample_step(converted, x, y, args.chunk, phases),
             "engine": lambda: engine.compute_gradients(x, y)}
    if args.forward:
        forward = engine_model(model, x, "forward")
        cases["engine-forward"] = lambda: forward.compute_gradients(x, y)
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    phases.clear()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    rules = []
    with torch.no_grad():
        h = x
        for j, b in enumerate(converted.blocks[:-1]):
            trained, _, buffers = _split(b)
            rec = record(b, trained, buffers, (h,))
            rules += [f"{j}:{r['node']}={r['rule']}" for r in choices(rec) if "rule" in r]
            h = rec.out
    ratios = {f"{case}/{base}": {"wall": med[case] / med[base], "cpu": med_cpu[case] / med_cpu[base]}
              for case in _MEASURED if case in cases for base in ("plain-backprop", "backprop")}
    return {"wall": med, "cpu": med_cpu, "all_wall": wall, "all_cpu": cpu, "ratio": ratios,
            "phases": {k: v / args.rounds for k, v in phases.items()}, "rules": rules,
            "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="samples per chunk in project (default: automatic)")
    parser.add_argument("--forward", action="store_true", help="also the engine's forward-mode version (slow)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument("--no-time", dest="time", action="store_false", help="skip the timing")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.width, args.batch, args.threads, args.chunk)))
        return
    result = {"width": args.width, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__, "targets": TARGETS}
    print(f"ResNet-18 width {args.width}, 8 blocks, batch {args.batch}, {args.threads} thread(s), CPU, "
          f"torch {torch.__version__}")
    if args.time:
        t = timing(args)
        result["time"] = t
        print(f"time (median of {args.rounds}; wall / CPU)   1-minute load average {t['load'][0]:.1f}")
        for name in t["wall"]:
            line = f"  {name:15s} {t['wall'][name] * 1e3:8.1f} ms / {t['cpu'][name] * 1e3:8.1f} ms"
            print(line)
        for pair, r in t["ratio"].items():
            case, base = pair.split("/")
            print(f"  {case:14s} / {base:15s} wall {r['wall']:.2f}x  CPU {r['cpu']:.2f}x   "
                  f"(target <= {TARGETS['time']}x)")
        print("  persample phases (wall): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t["phases"].items()))
        print("  rules: " + " ".join(t["rules"]))
    if args.memory:
        names = ("plain-backprop", "backprop", "persample", "engine", *(("engine-forward",) if args.forward else ()))
        rows = {c: memory(c, args) for c in names}
        result["memory"] = rows
        print("peak memory (each case in a fresh process)")
        for name, r in rows.items():
            print(f"  {name:15s} " + (f"{r['peak_bytes'] / 2**20:8.1f} MiB" if "peak_bytes" in r else r["error"]))
        for case in _MEASURED:
            ps = rows.get(case, {}).get("peak_bytes")
            for base in ("plain-backprop", "backprop"):
                if ps is not None and "peak_bytes" in rows[base]:
                    ratio = ps / rows[base]["peak_bytes"]
                    result[f"memory_ratio_{case}/{base}"] = ratio
                    print(f"  {case:14s} / {base:15s} {ratio:.2f}x   (target <= {TARGETS['memory']}x)")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
