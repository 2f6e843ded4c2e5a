"""Shared setup of the step-time benchmarks, and the ratio-to-backprop table.

* Settings: 2 torch threads, float32, seeded data, ``FWDTRANS_BENCH_ROUNDS`` /
  ``FWDTRANS_BENCH_SLOW_ROUNDS`` timed rounds (after one untimed warm-up call; ``test_scaling.py``
  uses ``FWDTRANS_BENCH_ROUNDS`` throughout).
* Smoke run (``--benchmark-disable``, the default in pyproject): every case runs its step once,
  except the ``slow`` ones (skipped unless ``FWDTRANS_BENCH_ALL=1``). A benchmark run
  (``--benchmark-enable``) runs every case; ``-m "not slow"`` leaves the slow ones out there too.
* At the end of a benchmark run every case's median is divided by the medians of ``backprop`` and
  ``plain-backprop`` with the same setup (``extra_info["setup"]``: J, width and mode in
  ``test_scaling.py``) from the same session: printed as tables, and stored in the JSON's
  ``extra_info`` (``ratio_to_backprop``, ``ratio_to_plain_backprop``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting collapse when another job holds a core: on 2 cores a
# 2-thread step runs ~7x slower while a test suite runs next to it. Passive waiting keeps figures
# usable on a shared machine; export OMP_WAIT_POLICY=ACTIVE on an idle one to measure spinning.
# Read when OpenMP starts, i.e. when torch is imported: hence before the import.
_OMP_PRESET = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = 2
torch.set_num_threads(THREADS)
torch.set_default_dtype(torch.float32)


def _load_report():
    """``bench/report.py`` under a private name (``report`` alone could clash on sys.path)."""
    name = "_fwdtrans_bench_report"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("report.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


report = _load_report()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        n = int(value) if value.strip() else default
    except ValueError:
        raise pytest.UsageError(f"{name}={value!r}: expected a positive integer") from None
    if n < 1:
        raise pytest.UsageError(f"{name}={value!r}: expected a positive integer")
    return n


def _benchmarks_disabled(config) -> bool:
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        return bool(session.disabled)
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: skipped in the smoke run (--benchmark-disable) unless "
                                       "FWDTRANS_BENCH_ALL=1; test_step_time.py: FWDTRANS_BENCH_SLOW_ROUNDS timed "
                                       "rounds")


def pytest_collection_modifyitems(config, items):
    if not _benchmarks_disabled(config) or os.environ.get("FWDTRANS_BENCH_ALL", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow case, not in the smoke run: set FWDTRANS_BENCH_ALL=1, or benchmark "
                                   "with --benchmark-enable")
    here = Path(__file__).parent
    for item in items:
        if Path(item.path).is_relative_to(here) and item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rounds() -> int:
    """Timed rounds per case (``FWDTRANS_BENCH_ROUNDS``, default 5)."""
    return _env_int("FWDTRANS_BENCH_ROUNDS", 5)


@pytest.fixture(scope="session")
def slow_rounds(rounds) -> int:
    """Timed rounds for ``slow`` cases: ``FWDTRANS_BENCH_SLOW_ROUNDS`` (default 1), at most ``rounds``."""
    return min(rounds, _env_int("FWDTRANS_BENCH_SLOW_ROUNDS", 1))


# ----------------------------------------------------------------------------- ratios
def pytest_benchmark_update_machine_info(config, machine_info):
    import fwdtrans

    machine_info["fwdtrans"] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fwdtrans": getattr(fwdtrans, "__version__", None),
        "omp_wait_policy": _omp_policy(),
        "max_loadavg_1m": max(_LOADS, default=None),
    }


_LOADS: list[float] = []  # 1-minute load average after each benchmark


def _omp_policy() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    return f"{policy} (torch imported before bench/conftest.py: may not apply)" if _OMP_PRESET else policy


def pytest_runtest_teardown(item):
    if hasattr(os, "getloadavg"):
        _LOADS.append(os.getloadavg()[0])


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Store each case's ratios to the same run's backprop medians in its ``extra_info``."""
    entries = output_json.get("benchmarks", [])
    rows = report.ratio_rows(entries)
    for entry, row in zip(entries, rows, strict=False):
        extra = entry.setdefault("extra_info", {})
        extra["ratio_to_backprop"] = row["ratio_backprop"]
        extra["ratio_to_plain_backprop"] = row["ratio_plain"]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    entries = []
    for bench in session.benchmarks:
        if bench.has_error or not bench.stats or not bench.stats.rounds:
            continue
        entries.append({"name": bench.name, "group": bench.group, "extra_info": dict(bench.extra_info),
                        "stats": {"median": bench.stats.median, "rounds": bench.stats.rounds}})
    if not entries:
        return
    rows = report.ratio_rows(entries)
    flat = [r for r in rows if r["blocks"] is None]
    tr = terminalreporter
    tr.write_sep("=", "fwdtrans step time: ratios to backprop (medians, same run)")
    if flat:
        for line in report.ratio_table(flat):
            tr.write_line(line)
        engines = report.engine_table(flat)
        if len(engines) > 2:
            tr.write_line("")
            tr.write_line("forward engine vs reference engine (< 1: forward-mode AD is faster)")
            for line in engines:
                tr.write_line(line)
    for title, table in report.scaling_tables(rows):  # test_scaling.py: per (width, mode), J as columns
        tr.write_line("")
        tr.write_line(f"{title}: ratio to backprop with the same J, width and mode")
        for line in table:
            tr.write_line(line)
    for line in report.batched_vs_loop(rows):
        tr.write_line(line)
    tr.write_line("")
    tr.write_line(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
                  f"OMP_WAIT_POLICY={_omp_policy()}")
    busy = max(_LOADS, default=0.0)
    if busy > (os.cpu_count() or 1) + 0.5:
        tr.write_line(f"warning: the load average reached {busy:.1f} on {os.cpu_count()} CPUs: other jobs ran "
                      "during the benchmark; prefer the paired ratios, or rerun on an idle machine", yellow=True)
