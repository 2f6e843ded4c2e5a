"""Both engines against backprop, estimator by estimator: step time, the cost model, in one run.

Usage:
    python bench/engines.py --width 64 --batch 64 --json bench/results-engines-w64-b64.json
    python bench/engines.py --width 16 --batch 128 --rows activity-exact weight-tensor --rounds 7
    python bench/engines.py --width 16 --batch 64 --max-ratio 0      # every case, however slow
    python bench/engines.py --cases local activity-exact-reference weight-tensor   # these cases (and backprop)
    python bench/engines.py --show bench/engines-w16-b64-run1.json    # the tables of earlier runs
    python bench/engines.py --width 16 --compile --rows local activity-joint --cases local activity-joint-forward

The model is the paper's CIFAR ResNet-18 (``fwdtrans.models.resnet18(width)``) cut into its 8 blocks
(``blocks=model.paper_cuts()``) with the paper's CNN heads (``heads="cnn"``), in train mode, on one batch of
random 3x32x32 images with 10 classes, float32, ``--threads`` threads (default 2). With ``--compile`` every
case runs compiled (``compute_gradients(x, y, compile=True)``; ``plain-backprop``: ``torch.compile(model)``),
and every ratio divides by compiled backprop.

Rows (the estimators the paper's official code also has come first; each with both engines, ``forward`` and
``reference``, where the method allows):

* ``backprop`` (fwdtrans, ``guess="global"``): every ratio's baseline; ``plain-backprop``: the unconverted
  model, ``cross_entropy(model(x), y).backward()``;
* ``local``: greedy local learning (``target="local", guess="local"``; one engine);
* ``activity-exact``: global target, local guess, activity space, ``per_sample="exact"`` (the paper's Eq. 5);
* ``activity-by-loss``: the same with ``per_sample="by-loss"`` (the default);
* ``activity-joint``: the same with ``streams="joint"``;
* ``weight-tensor``: weight space, ``granularity="tensor"`` (Eq. 4, the official code's ``avg-weight``);
* ``weight-joint``: weight space, ``granularity="joint"``;
* ``weight-sample``: weight space, ``granularity="sample"`` (the official code's default weight space).

A case is skipped, with the reason in the table and the JSON, when the cost model (``fwdtrans.inspect(...,
method=...).cost``) predicts more than ``--max-ratio`` times backprop (default 16: the reference engine reading
per output sample, the forward engine's one stream per sample), or, for the forward engine, when its largest
bundle of open tangents exceeds ``--max-tangent-gb`` (default 1; the ``vmap(jvp)`` temporaries are a few
times more).

Timing: one untimed warm-up step of every case, then ``--rounds`` (default 7) rounds; each round runs every
case once (``converted.compute_gradients(x, y)``), in an order rotated from round to round. Per case: the
median wall-clock time and the median CPU time of the process (``time.process_time``: on a machine shared with
other jobs it moves far less than wall-clock time). Ratios divide by the ``backprop`` medians of the same run;
``paired`` is the median over rounds of the case's CPU time over backprop's in that round. The 1-minute load
average is recorded before and after the run and at every round.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdtrans

GLOBAL_LOCAL = dict(target="global", guess="local")
ROWS: dict[str, dict | None] = {  # row -> convert()'s method keywords (None: the unconverted model)
    "plain-backprop": None,
    "backprop": dict(target="global", guess="global"),
    "local": dict(target="local", guess="local"),
    "activity-exact": dict(GLOBAL_LOCAL, space="activity", per_sample="exact"),
    "activity-by-loss": dict(GLOBAL_LOCAL, space="activity"),
    "activity-joint": dict(GLOBAL_LOCAL, space="activity", streams="joint"),
    "weight-tensor": dict(GLOBAL_LOCAL, space="weight", granularity="tensor"),
    "weight-joint": dict(GLOBAL_LOCAL, space="weight", granularity="joint"),
    "weight-sample": dict(GLOBAL_LOCAL, space="weight", granularity="sample"),
}
ONE_ENGINE = ("plain-backprop", "backprop", "local")  # the engine does not change these
CLASSES = 10


@dataclasses.dataclass
class Case:
    row: str
    engine: str | None
    method: dict | None
    cost: fwdtrans.Cost | None = None
    skipped: str | None = None
    step: object = None
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> str:
        return self.row if self.engine is None else f"{self.row}-{self.engine}"


def cases(rows: list[str], only: list[str] | None = None) -> list[Case]:
    """Every engine of each row; with ``only`` (rows or case ids such as ``weight-tensor-forward``), those alone."""
    out = []
    for row in rows:
        method = ROWS[row]
        if row in ONE_ENGINE:
            out.append(Case(row, None, method))
            continue
        for engine in ("reference", "forward"):
            out.append(Case(row, engine, dict(method or {}, engine=engine)))
    return [c for c in out if only is None or c.row == "backprop" or c.row in only or c.id in only]


def heads(args):
    """The paper's CNN heads (``heads="cnn"``), or ``CNNHead(width=--head-width)``."""
    return fwdtrans.heads.CNNHead(width=args.head_width) if args.head_width else "cnn"


def build(case: Case, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """Set ``case.step`` (or ``case.skipped``), and its cost."""
    if case.method is None:
        params = list(model.parameters())
        forward = torch.compile(model) if args.compile else model

        def plain():
            for p in params:
                p.grad = None
            F.cross_entropy(forward(x), y).backward()

        case.step = plain
        return
    method = fwdtrans.Method(**case.method)
    report = fwdtrans.inspect(model, x[:2], blocks=model.paper_cuts(), heads=heads(args), method=method,
                              batch=args.batch)
    case.cost = report.cost
    ratio = case.cost.ratio(method.engine)
    if args.max_ratio and ratio > args.max_ratio:
        why = (f"{case.cost.streams} streams" if method.engine == "forward" else
               "the walk back once per output sample")
        case.skipped = f"predicted {ratio:.0f}x backprop ({why}), over --max-ratio {args.max_ratio:g}"
        return
    if method.engine == "forward" and case.cost.tangent_bytes > args.max_tangent_gb * 2**30:
        case.skipped = (f"largest bundle of open tangents {case.cost.tangent_bytes / 2**30:.1f} GiB "
                        f"({case.cost.streams} streams), over --max-tangent-gb {args.max_tangent_gb:g}")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "propagates N tangent streams": measured on purpose
        converted = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), heads=heads(args), method=method)
    converted.train()
    case.step = lambda: converted.compute_gradients(x, y, compile=args.compile)


def _cpu_model() -> str | None:
    """The CPU's model name (Linux), which ``platform`` does not give."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(fwdtrans.__file__).parent).stdout.strip()  # the code measured
    except (OSError, subprocess.CalledProcessError):
        return None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = fwdtrans.models.resnet18(width=args.width, num_classes=CLASSES).train()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g)
    todo = cases(args.rows, args.cases)
    for case in todo:
        build(case, model, x, y, args)
    live = [c for c in todo if c.step is not None]
    load_before = os.getloadavg()
    loads = []
    for r in range(args.rounds + 1):  # round 0: the warm-up
        shift = r % len(live)
        for case in live[shift:] + live[:shift]:
            w, c = time.perf_counter(), time.process_time()
            case.step()
            if r:
                case.wall.append(time.perf_counter() - w)
                case.cpu.append(time.process_time() - c)
        loads.append(os.getloadavg()[0])
        print(f"round {r}/{args.rounds} done, load {loads[-1]:.2f}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    base = next(c for c in todo if c.row == "backprop")
    rows = []
    for case in todo:
        row = {"row": case.row, "case": case.id, "engine": case.engine, "method": case.method,
               "skipped": case.skipped}
        if case.cost is not None:
            engine = case.engine or "forward"
            row.update(streams=case.cost.streams, model_F=round(case.cost.forward if engine == "forward"
                                                                 else case.cost.reference, 3),
                       model_ratio=round(case.cost.ratio(engine), 3),
                       other_engine_model_ratio=round(case.cost.ratio("reference" if engine == "forward"
                                                                      else "forward"), 3))
        if case.wall:
            row.update(wall_s=case.wall, cpu_s=case.cpu, wall_median_s=statistics.median(case.wall),
                       cpu_median_s=statistics.median(case.cpu),
                       ratio_wall=statistics.median(case.wall) / statistics.median(base.wall),
                       ratio_cpu=statistics.median(case.cpu) / statistics.median(base.cpu),
                       paired_cpu=statistics.median(c / b for c, b in zip(case.cpu, base.cpu, strict=True)))
        rows.append(row)
    return {"kind": "engines", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {"model": f"resnet18(width={args.width})", "width": args.width, "batch": args.batch,
                       "blocks": "paper_cuts() (8)",
                       "heads": f"CNNHead(width={args.head_width})" if args.head_width else "cnn",
                       "rounds": args.rounds, "threads": args.threads, "cases": args.cases, "compile": args.compile,
                       "seed": args.seed, "max_ratio": args.max_ratio, "max_tangent_gb": args.max_tangent_gb},
            "machine": {"cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
                        "cpu_count": os.cpu_count(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version(),
                        "torch": torch.__version__, "fwdtrans": fwdtrans.__version__, "commit": _commit()},
            "load": {"before": load_before, "after": load_after, "rounds_1m": loads}, "rows": rows}


def table(data: dict) -> list[str]:
    """Markdown: one line per case."""
    c, load = data["config"], data["load"]
    threads = f"{c['threads']} thread" + ("s" if c["threads"] > 1 else "")
    m = data["machine"]
    machine = f"; {m['cpu_model']}, {m['cpu_count']} cores" if m.get("cpu_model") else ""
    compiled = ", compiled (`compile=True`)" if c.get("compile") else ""
    lines = [f"ResNet-18 width {c['width']}, batch {c['batch']}, {c['blocks']} blocks, heads {c['heads']}{compiled}; "
             f"medians of {c['rounds']} interleaved steps after a warm-up, {threads}; 1-minute load "
             f"{load['before'][0]:.2f} before, {max(load['rounds_1m'], default=0):.2f} at most, "
             f"{load['after'][0]:.2f} after; {data['date']}{machine}.", "",
             "| estimator | engine | streams | model (F) | model / backprop | CPU / backprop | paired CPU | "
             "wall / backprop | CPU median |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        model = (f"{r['model_F']:.1f}", f"{r['model_ratio']:.2f}") if "model_F" in r else ("", "")
        if r.get("skipped"):
            measured = ("skipped: " + r["skipped"], "", "", "")
        elif "ratio_cpu" in r:
            measured = (f"**{r['ratio_cpu']:.2f}**", f"{r['paired_cpu']:.2f}", f"{r['ratio_wall']:.2f}",
                        f"{r['cpu_median_s'] * 1000:.0f} ms")
        else:
            measured = ("", "", "", "")
        lines.append(f"| `{r['row']}` | {r['engine'] or ''} | {r.get('streams', '')} | {model[0]} | {model[1]} | "
                     + " | ".join(measured) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-width", type=int, default=0,
                        help="CNNHead(width=N) heads (default 0: the paper's, heads='cnn', CNN width 32)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"rows to run (backprop always runs): {', '.join(ROWS)}")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="only these rows or cases (a row and its engine: weight-tensor-reference), and backprop")
    parser.add_argument("--max-ratio", type=float, default=16.0,
                        help="skip a case the cost model puts above this many backprop steps (0: none skipped)")
    parser.add_argument("--max-tangent-gb", type=float, default=1.0,
                        help="skip a forward-engine case whose largest bundle of open tangents exceeds this")
    parser.add_argument("--compile", action="store_true",
                        help="every case compiled (ratios to compiled backprop); the first round compiles")
    parser.add_argument("--json", type=Path, help="write the results here (atomically)")
    parser.add_argument("--show", type=Path, nargs="+", metavar="JSON",
                        help="print the tables of earlier runs (the Performance page's) and exit")
    args = parser.parse_args(argv)
    if args.show:
        for path in args.show:
            title, *rows = table(json.loads(path.read_text()))
            print("\n".join([f"`{path.name}`: {title}", *rows]), end="\n\n")
        return 0
    if args.cases:
        known = {c.id for c in cases(list(ROWS))} | set(ROWS)
        if unknown := sorted(set(args.cases) - known):
            parser.error(f"unknown cases {unknown}: choose from {sorted(known)}")
    if "backprop" not in args.rows:
        args.rows = ["backprop", *args.rows]
    data = run(args)
    print("\n".join(table(data)))
    if args.json:
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, prefix=f".{args.json.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
