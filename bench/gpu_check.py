"""One command for a borrowed GPU: the CUDA tests, step time and peak memory against backprop, a CIFAR-10 epoch.

Usage:
    python bench/gpu_check.py                           # = make gpu-check: one CUDA GPU, under 10 minutes
    python bench/gpu_check.py --device cpu --quick      # smoke run of this script (about a minute on 2 cores)

Sections, in this order (``--sections`` picks some, in the order given); each is guarded: a failure is recorded with its
error and the next section runs. ``--budget-s`` bounds the whole run: a section that would start
with too little time left is skipped, and one still running at the deadline is stopped (recorded so).

* ``environment``: device name, torch / CUDA / cuDNN versions, TF32 settings, commit.
* ``tests``: ``pytest tests/test_cuda.py -m cuda -W default`` in a subprocess (a warning is counted and
  listed, not turned into an error): outcome counts and the output's tail.
* ``step_time``: ResNet-18 width 64, batch 128 of random 3x32x32 images, the paper's 8 blocks
  (``paper_cuts()``), CNN heads (the paper's width 32), float32, eager: per method, the first step,
  then the median of ``--steps`` timed ``compute_gradients`` steps after warm-up (each ended by
  ``torch.cuda.synchronize()``), and the allocator's peak over the memory held before the first
  step (model, heads, batch); both as ratios to backprop measured in the same process. CPU: no
  memory figure (a process's peak RSS cannot be reset; ``bench/memory.py`` measures it per process).
* ``cifar10``: one flagship epoch on the full CIFAR-10 (``--cifar10 DIR``, default
  ``../shared/data/cifar10``; a folder holding only ``cifar10_jpeg.npz`` is first materialized in the
  official format, in the background from the start) with ``python -m fwdtrans train``: test
  accuracy, seconds per step, epoch wall time. Skipped, with the reason, without the data.
* ``step_time_compiled``: backprop and the flagship with ``compute_gradients(x, y, compile=True)``
  (what ``train_step(optimizer, compile=True)`` runs before its eager optimizer step); the first
  step pays the compilation. Last, so that a slow compilation cannot crowd out the others.

The JSON (``--json``, default ``bench/results-gpu.json``) is rewritten atomically after every
section, so a run cut short still leaves the finished sections; a compact summary is printed at the end.
``--quick``: width 8, batch 16, 1 warm-up and 2 timed steps, CIFAR-10 limited to 256 images, and on
a CPU the ``aot_eager`` compile backend (inductor's C++ code generation takes minutes per graph there).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting crawl when another process holds a core (here: the background
# CIFAR-10 materialization, the test subprocess's leftovers); read when torch is imported (see conftest.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from memory import CASES  # bench/memory.py: the methods' convert() keywords

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's fwdtrans, installed or not (subprocesses run in ROOT with -m)

import fwdtrans  # noqa: E402 - this checkout's, from the path set above
from fwdtrans.app import TrainConfig  # noqa: E402
from fwdtrans.app._rundir import write_json  # noqa: E402

DEFAULT_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
SECTIONS = ("environment", "tests", "step_time", "cifar10", "step_time_compiled")
MIN_SECONDS = {"environment": 0, "tests": 60, "step_time": 30, "cifar10": 60, "step_time_compiled": 60}
METHODS = {
    "backprop": CASES["backprop"],
    "flagship": CASES["flagship"],
    "joint": CASES["activity-joint"],
    "weight": {**CASES["flagship"], "space": "weight", "granularity": "tensor"},
    "local": CASES["local"],
}
COMPILED = ("backprop", "flagship")
TAIL = 4000  # characters of a subprocess's output kept in the JSON
MARGIN_S = 3  # a subprocess is killed this long before the deadline


class DeadlineReached(Exception):
    """The global budget ran out while a section was running."""


class Check:
    """The run's settings, deadline, temporary folder and results."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.tmp = args, tmp
        self.device = args.device
        self.quick = args.quick
        self.width, self.batch = (8, 16) if args.quick else (64, 128)
        self.warmup, self.steps = (1, args.steps or 2) if args.quick else (2, args.steps or 10)
        self.compile = {"backend": "aot_eager"} if args.quick and args.device == "cpu" else True
        self.backend = "aot_eager" if isinstance(self.compile, dict) else "inductor"
        self.started = time.perf_counter()
        self.deadline = self.started + args.budget_s
        self.materialize: subprocess.Popen | None = None
        self.results = {"tool": "bench/gpu_check.py", "args": vars(args),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "budget_s": args.budget_s, "finished": False, "sections": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        write_json(self.args.json, self.results)


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group; kill the group at ``timeout`` (or on any exception).
    Returns (exit status, or None when it was killed; stdout and stderr together; seconds).
    Sections pass the budget left minus ``MARGIN_S``: killed before the deadline, the output is kept."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # output up to a kill
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        _kill(proc)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a child outside the group still holds the pipe
            out = ""
        return None, out + f"\n[killed after {timeout:.0f} s: the budget ran out]", time.perf_counter() - start
    except BaseException:
        _kill(proc)
        raise


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group holds its children too (e.g. compile workers)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- sections
def environment(check: Check) -> dict:
    out = {"device": check.device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "fwdtrans": fwdtrans.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if check.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        warnings.filterwarnings("ignore", "Please use the new API settings to control TF32")  # torch 2.9-2.11
        out.update(device_name=props.name, gpu_count=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        out["device_name"] = platform.processor() or platform.machine()
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        code, commit, _ = _run(["git", "rev-parse", "HEAD"], 10)
    except OSError:  # no git
        code, commit = None, ""
    out["commit"] = commit.strip() if code == 0 else None
    return out


def tests(check: Check) -> dict:
    # -W default: a warning is listed in the output's warnings summary instead of failing its test
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-v", "--durations=0", "-W", "default",
           "-p", "no:cacheprovider"]
    code, out, seconds = _run(cmd, check.left() - MARGIN_S)
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ \w+.* in [\d.]+s", line)), "")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|warnings?)",
                                                       summary)}
    if not summary:  # killed: count the tests reported so far
        for word in re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)", out):
            counts[word.lower()] = counts.get(word.lower(), 0) + 1
    result = {"command": " ".join(cmd[1:]), "returncode": code, "counts": counts, "seconds": round(seconds, 1),
              "output_tail": out[-TAIL:]}
    if code != 0:
        status = "killed: the budget ran out" if code is None else f"exit status {code}"
        result["error"] = f"pytest {status}: {summary or 'no summary line'}"
    return result


def _measure(check: Check, name: str, compiled: bool) -> dict:
    """One method's first step, median step time and peak memory (see the module docstring)."""
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=check.width).train().to(check.device)
    x = torch.randn(check.batch, 3, 32, 32, device=check.device)
    y = torch.randint(0, 10, (check.batch,), device=check.device)
    heads = TrainConfig(width=check.width, blocks=8, heads="cnn").head_spec()
    with warnings.catch_warnings(record=True) as caught:  # fwdtrans's "propagates N tangent streams"
        warnings.simplefilter("always", UserWarning)
        converted = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), heads=heads, seed=0, **METHODS[name])
    options = check.compile if compiled else False
    method = converted.method
    row = {"case": name, "mode": "compiled" if compiled else "eager", "method": method.describe(),
           "tangent_streams": method.stream_count(len(converted.blocks), check.batch,
                                                  [len(list(b.parameters())) for b in converted.blocks]),
           "convert_warnings": sorted({str(w.message) for w in caught})}
    check.sync()
    base = torch.cuda.memory_allocated() if check.device == "cuda" else None

    def step() -> float:
        start = time.perf_counter()
        converted.compute_gradients(x, y, compile=options)
        check.sync()
        return time.perf_counter() - start

    row["first_step_s"] = step()  # compiled: the compilation
    for _ in range(check.warmup - 1 + compiled):
        step()
    if check.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(check.steps)]
    row.update(median_s=statistics.median(times), min_s=min(times), steps=len(times))
    if base is not None:
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    grads = [p.grad for p in converted.blocks.parameters()]
    if not all(g is not None and bool(torch.isfinite(g).all()) for g in grads):
        raise RuntimeError(f"{name}: a block parameter got no gradient or a non-finite one")
    return row


def _step_time(check: Check, compiled: bool) -> dict:
    names = COMPILED if compiled else tuple(METHODS)
    rows = []
    for name in names:
        if check.left() < (30 if compiled else 5):
            rows.append({"case": name, "status": "skipped", "reason": f"budget: {check.left():.0f} s left"})
            continue
        if compiled:
            torch._dynamo.reset()  # fresh compile caches for every case
        try:
            rows.append({**_measure(check, name, compiled), "status": "ok"})
        except DeadlineReached:
            rows.append({"case": name, "status": "failed", "error": "stopped: the budget ran out"})
        except Exception as e:  # noqa: BLE001 -- recorded; the other cases still run
            rows.append({"case": name, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-TAIL:]})
        finally:
            gc.collect()
            if check.device == "cuda":
                torch.cuda.empty_cache()
    eager = check.results["sections"].get("step_time", {}).get("rows", [])
    _ratios(rows, rows, "")
    if compiled:
        _ratios(rows, eager, "_eager")  # compiled against eager backprop
    result = {"setup": (f"resnet18(width={check.width}), batch {check.batch}x3x32x32, 8 blocks (paper_cuts()), "
                        f"CNN heads, float32, {check.device}, "
                        f"{'compiled, ' + check.backend if compiled else 'eager'}"),
              "warmup_steps": check.warmup + compiled, "timed_steps": check.steps, "rows": rows}
    if check.device != "cuda":
        result["memory"] = "not measured on a CPU: the peak RSS cannot be reset within a process (bench/memory.py)"
    failed = [r["case"] for r in rows if r["status"] == "failed"]
    if failed:
        result["error"] = f"{', '.join(failed)} failed"
    return result


def _ratios(rows: list[dict], baseline_rows: list[dict], suffix: str) -> None:
    base = next((r for r in baseline_rows if r["case"] == "backprop" and r.get("status") == "ok"), None)
    for r in rows:
        if r.get("status") != "ok" or base is None:
            continue
        r[f"time_ratio_to_backprop{suffix}"] = r["median_s"] / base["median_s"]
        if "peak_bytes" in r and base.get("peak_bytes"):
            r[f"memory_ratio_to_backprop{suffix}"] = r["peak_bytes"] / base["peak_bytes"]


def step_time(check: Check) -> dict:
    return _step_time(check, compiled=False)


def step_time_compiled(check: Check) -> dict:
    return _step_time(check, compiled=True)


def _cifar10_source(check: Check) -> tuple[Path | None, str]:
    """The folder to pass as --data-dir (or None) and how it was found or why it is missing."""
    where = Path(check.args.cifar10).resolve()
    if (where / "cifar-10-batches-py").is_dir() or (where / "data_batch_1").is_file():
        return where, f"official python format in {where}"
    if (where / "cifar10_jpeg.npz").is_file() and (where / "materialize.py").is_file():
        return None, f"materialize {where / 'cifar10_jpeg.npz'}"
    return None, f"no CIFAR-10 at {where}: neither cifar-10-batches-py/ nor cifar10_jpeg.npz with materialize.py"


def start_materialize(check: Check) -> None:
    """Write the official format from the JPEG copy in the background, while the earlier sections run."""
    data, how = _cifar10_source(check)
    if data is None and how.startswith("materialize"):
        script = Path(check.args.cifar10).resolve() / "materialize.py"
        with open(check.tmp / "materialize.log", "w") as log:  # the child keeps its own descriptor
            check.materialize = subprocess.Popen([sys.executable, str(script), str(check.tmp / "cifar10")],
                                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def cifar10(check: Check) -> dict:
    data, how = _cifar10_source(check)
    if data is None and check.materialize is None:
        return {"status": "skipped", "reason": how}
    result = {"data": how}
    if data is None:
        start = time.perf_counter()
        try:
            code = check.materialize.wait(timeout=max(check.left(), 1))
        except BaseException:
            _kill(check.materialize)
            raise
        result["materialize_s"] = round(time.perf_counter() - start, 1)  # the part not hidden by earlier sections
        if code != 0:
            log = (check.tmp / "materialize.log").read_text()
            result["error"] = f"materialize.py exit status {code}: {log[-TAIL:]}"
            return result
        data = check.tmp / "cifar10"
    run_dir = check.tmp / "cifar10-run"
    width, batch = (8, 64) if check.quick else (64, 128)
    cmd = [sys.executable, "-m", "fwdtrans", "train", "--device", check.device, "--dataset", "cifar10",
           "--data-dir", str(data), "--epochs", "1", "--width", str(width), "--blocks", "8", "--heads", "cnn",
           "--batch-size", str(batch), "--target", "global", "--guess", "local", "--space", "activity",
           "--run-dir", str(run_dir), *(["--limit", "256"] if check.quick else [])]
    code, out, seconds = _run(cmd, check.left() - MARGIN_S)
    result.update(command=" ".join(["python", *cmd[1:]]), returncode=code, wall_s=round(seconds, 1),
                  output_tail=out[-TAIL:])
    if code != 0:
        status = "killed: the budget ran out" if code is None else f"exit status {code}"
        result["error"] = f"fwdtrans train {status}: {_first_line((out.strip().splitlines() or [''])[-1])}"
        return result
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch = summary["epochs"][0]
    result.update(test_accuracy=summary["test_accuracy"], seconds_per_step=summary["seconds_per_step"],
                  first_step_s=summary["first_step_seconds"], epoch_s=epoch["seconds"], steps=epoch["step"],
                  train_loss=epoch["train_loss"], train_images=summary["data"]["train"],
                  test_images=summary["data"]["test"], device=summary["device"],
                  setup=f"resnet18(width={width}), 8 blocks, CNN heads, batch {batch}, flagship, 1 epoch, eager")
    return result


# ----------------------------------------------------------------------------- driver
def run_section(check: Check, name: str) -> None:
    left = check.left()
    if left < MIN_SECONDS[name]:
        result = {"status": "skipped", "reason": f"budget: {max(left, 0):.0f} s left of {check.args.budget_s} s, "
                                                 f"the section needs at least {MIN_SECONDS[name]} s"}
    else:
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _deadline)
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
        try:
            result = globals()[name](check)
        except DeadlineReached:
            result = {"error": f"stopped: the budget of {check.args.budget_s} s ran out"}
        except Exception as e:  # noqa: BLE001 -- recorded; the other sections still run
            result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-TAIL:]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        result.setdefault("status", "failed" if "error" in result else "ok")
        result["section_s"] = round(time.perf_counter() - start, 1)
    check.results["sections"][name] = result
    check.save()
    print(f"[gpu_check] {name}: {result['status']} ({check.left():.0f} s of the budget left)", flush=True)


def _deadline(signum, frame):
    raise DeadlineReached


def summary_lines(results: dict) -> list[str]:
    """A compact human-readable summary of the JSON."""
    s = results["sections"]
    lines = [f"gpu_check: {results['elapsed_s']:.0f} s of a {results['budget_s']} s budget"]
    env = s.get("environment", {})
    if env.get("status") == "ok":
        lines.append(f"  device {env['device_name']} | torch {env['torch']} | CUDA {env['cuda']} | "
                     f"fwdtrans {env['fwdtrans']} | commit {(env['commit'] or '?')[:10]}")
    for name, r in s.items():
        head = f"  {name}: {r['status']}" + (f" ({r['reason']})" if "reason" in r else "")
        if "error" in r:
            head += f": {_first_line(r['error'], 200)}"
        lines.append(head)
        if name == "tests" and "counts" in r:
            lines.append("    " + (", ".join(f"{n} {k}" for k, n in r["counts"].items()) or "no tests ran"))
        if name.startswith("step_time") and "rows" in r:
            lines.append(f"    {'case':<10} {'first s':>8} {'median ms':>10} {'x backprop':>10} {'peak MiB':>9} "
                         f"{'x backprop':>10}")
            for row in r["rows"]:
                if row["status"] != "ok":
                    why = _first_line(row.get("error", row.get("reason")))
                    lines.append(f"    {row['case']:<10} {row['status']}: {why}")
                    continue
                peak = row.get("peak_bytes")
                lines.append(f"    {row['case']:<10} {row['first_step_s']:>8.1f} {row['median_s'] * 1e3:>10.1f} "
                             f"{_fmt(row.get('time_ratio_to_backprop')):>10} "
                             f"{'-' if peak is None else f'{peak / 2**20:.0f}':>9} "
                             f"{_fmt(row.get('memory_ratio_to_backprop')):>10}"
                             + (f"  (x eager backprop {_fmt(row.get('time_ratio_to_backprop_eager'))})"
                                if row["mode"] == "compiled" else ""))
        if name == "cifar10" and "test_accuracy" in r:
            lines.append(f"    test accuracy {r['test_accuracy']:.2%} after 1 epoch ({r['train_images']} images), "
                         f"{r['seconds_per_step'] * 1e3:.0f} ms/step, epoch {r['epoch_s']:.0f} s")
    return lines


def _first_line(text: str | None, width: int = 100) -> str:
    return ((text or "").strip().splitlines() or [""])[0][:width]


def _fmt(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results-gpu.json"), help="output (atomic)")
    parser.add_argument("--budget-s", type=float, default=540, help="the whole run's time budget in seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10; --quick: 2)")
    parser.add_argument("--cifar10", default=str(DEFAULT_CIFAR10), help="CIFAR-10: the official python format "
                        "(DIR/cifar-10-batches-py/) or a folder with cifar10_jpeg.npz and materialize.py")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                        help=f"run these, in this order (default: {' '.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of this script")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: use at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        error = (f"--device cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
                 "(torch.cuda.is_available() is False); use --device cpu --quick for a smoke run")
        write_json(args.json, {"tool": "bench/gpu_check.py", "args": vars(args), "error": error, "finished": False})
        print(f"gpu_check: error: {error}\nwrote {args.json}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        check = Check(args, Path(tmp))
        if "cifar10" in args.sections:
            start_materialize(check)
        try:
            for name in dict.fromkeys(args.sections):
                run_section(check, name)
        finally:
            if check.materialize is not None and check.materialize.poll() is None:
                _kill(check.materialize)
                check.materialize.wait()
        check.results["finished"] = True
        check.save()
    print("\n".join(summary_lines(check.results)))
    print(f"wrote {args.json}")
    return int(any(r["status"] == "failed" for r in check.results["sections"].values()))


if __name__ == "__main__":
    sys.exit(main())
