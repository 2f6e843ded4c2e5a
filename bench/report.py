"""Ratio tables from a pytest-benchmark JSON of the fwdtrans step-time suites.

Usage::

    python bench/report.py bench/results.json                  # print markdown to stdout
    python bench/report.py bench/results.json --markdown OUT.md  # also write it to OUT.md

Every case's median step time is divided by the median of the ``backprop`` case (fwdtrans,
``guess="global"``) and of the ``plain-backprop`` case (the unconverted model) measured in the same
run with the same setup (``extra_info["setup"]``: for ``test_scaling.py`` the number of blocks J, the
width and eager/compiled), so the ratios compare like with like even when the machine is loaded. A
second table puts the forward engine next to the reference engine for every space/guess family;
``test_scaling.py``'s cases get one table per (width, mode) with J as columns.

``bench/conftest.py`` imports this file to print the same tables at the end of a benchmark run and
to store the ratios in the JSON's ``extra_info``; it only needs the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BACKPROP = "backprop"
PLAIN = "plain-backprop"


def _case(bench: dict) -> str:
    """The case id: ``extra_info["case"]``, else the pytest parameter (``test_step[flagship]``)."""
    extra = bench.get("extra_info") or {}
    if extra.get("case"):
        return str(extra["case"])
    name = str(bench.get("name", ""))
    return name[name.find("[") + 1:-1] if name.endswith("]") and "[" in name else name


def _median(bench: dict) -> float | None:
    stats = bench.get("stats") or {}
    median = stats.get("median")
    return float(median) if median is not None else None


def _setup(bench: dict) -> str | None:
    return (bench.get("extra_info") or {}).get("setup")


def ratio_rows(benchmarks: list[dict]) -> list[dict]:
    """One row per benchmark (in run order): case, group, median seconds, and both ratios.

    ``benchmarks`` are dicts shaped like the JSON's ``benchmarks`` entries (``stats.median``,
    ``extra_info``, ``group``, ``name``). Baselines are looked up among the cases with the same
    ``extra_info["setup"]``; a ratio is ``None`` when its baseline was not run.
    """
    medians = {(_setup(b), _case(b)): _median(b) for b in benchmarks}
    rows = []
    for b in benchmarks:
        case, median, setup = _case(b), _median(b), _setup(b)
        base, plain = medians.get((setup, BACKPROP)), medians.get((setup, PLAIN))
        extra = b.get("extra_info") or {}
        rows.append({
            "case": case,
            "group": b.get("group"),
            "setup": setup,
            "blocks": extra.get("blocks"),  # test_scaling.py: J, width, eager/compiled
            "width": extra.get("width"),
            "mode": extra.get("mode"),
            "method": extra.get("method"),
            "engine": extra.get("engine"),
            "family": extra.get("family"),
            "guess": extra.get("guess"),
            "streams": extra.get("tangent_streams"),
            "rounds": (b.get("stats") or {}).get("rounds"),
            "median_s": median,
            "ratio_backprop": median / base if median and base else None,
            "ratio_plain": median / plain if median and plain else None,
            "ratio_paired": extra.get("paired_ratio_to_backprop"),
        })
    return rows


def engine_rows(rows: list[dict]) -> list[dict]:
    """Forward vs reference engine for every (family, guess) measured with both."""
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        if r["family"] and r["engine"] and r["median_s"]:
            pairs.setdefault((r["family"], r["guess"]), {})[r["engine"]] = r
    out = []
    for (family, guess), by in pairs.items():
        if "forward" in by and "reference" in by:
            f, ref = by["forward"], by["reference"]
            paired = f["ratio_paired"] / ref["ratio_paired"] if f["ratio_paired"] and ref["ratio_paired"] else None
            out.append({"family": family, "guess": guess, "forward_s": f["median_s"], "reference_s": ref["median_s"],
                        "forward_over_reference": f["median_s"] / ref["median_s"],
                        "forward_over_reference_paired": paired})
    return out


def num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def ratio_table(rows: list[dict]) -> list[str]:
    """``case | median ms | ratio to backprop | ratio to plain backprop | paired ratio to backprop``.

    The last column (interleaved backprop steps, see ``test_step_time.py``) is left out when no
    row has it (JSON from another suite version).
    """
    paired = any(r["ratio_paired"] is not None for r in rows)
    header = ["case", "median ms", "ratio to backprop", "ratio to plain backprop"]
    body = [[f"`{r['case']}`", num(r["median_s"] and r["median_s"] * 1e3, ".1f"),
             num(r["ratio_backprop"], ".2f"), num(r["ratio_plain"], ".2f")] for r in rows]
    if paired:
        header.append("paired ratio to backprop")
        for line, r in zip(body, rows, strict=False):
            line.append(num(r["ratio_paired"], ".2f"))
    return table(header, body)


def engine_table(rows: list[dict]) -> list[str]:
    """``family | guess | forward ms | reference ms | forward / reference`` (+ the paired quotient)."""
    engines = engine_rows(rows)
    paired = any(e["forward_over_reference_paired"] is not None for e in engines)
    header = ["family", "guess", "forward ms", "reference ms", "forward / reference"]
    body = [[e["family"], e["guess"], f"{e['forward_s'] * 1e3:.1f}", f"{e['reference_s'] * 1e3:.1f}",
             f"{e['forward_over_reference']:.2f}"] for e in engines]
    if paired:  # quotient of the two paired ratios to backprop
        header.append("forward / reference (paired)")
        for line, e in zip(body, engines, strict=False):
            line.append(num(e["forward_over_reference_paired"], ".2f"))
    return table(header, body)


def scaling_tables(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """``test_scaling.py``'s ratios to backprop: ``(title, table)`` per (width, mode), a row per
    method and a column per J; the backprop cells also give backprop's median."""
    scaled = [r for r in rows if r["blocks"] is not None]
    out = []
    for width, mode in sorted({(r["width"], r["mode"]) for r in scaled}, key=lambda k: (k[0], k[1] != "eager")):
        cells = {(r["case"], r["blocks"]): r for r in scaled if (r["width"], r["mode"]) == (width, mode)}
        js = sorted({j for _, j in cells})
        body = []
        for case in dict.fromkeys(c for c, _ in cells):
            line = [f"`{case}`"]
            for j in js:
                r = cells.get((case, j))
                text = "—" if r is None else num(r["ratio_backprop"], ".2f")
                if r is not None and case == BACKPROP and r["median_s"]:
                    text += f" ({r['median_s'] * 1e3:.0f} ms)"
                line.append(text)
            body.append(line)
        out.append((f"width {width}, {mode}", table(["method", *(f"J={j}" for j in js)], body)))
    return out


def batched_vs_loop(rows: list[dict]) -> list[str]:
    """``flagship`` (per-block streams, batched) over ``flagship-sequential`` (a loop of per-block
    JVPs), for every setup that ran both."""
    by = {(r["setup"], r["case"]): r for r in rows if r["median_s"]}
    return [f"{r['setup']}: batched streams / loop of per-block JVPs = "
            f"{by[(setup, 'flagship')]['median_s'] / r['median_s']:.2f}"
            for (setup, case), r in by.items() if case == "flagship-sequential" and (setup, "flagship") in by]


def machine_items(data: dict) -> list[tuple[str, object]]:
    """Where and when the figures were measured, from the JSON's ``machine_info`` and first benchmark."""
    info = data.get("machine_info") or {}
    cpu = info.get("cpu") or {}
    extras = [b.get("extra_info") or {} for b in data.get("benchmarks", [])]
    first = extras[0] if extras else {}
    fw = info.get("fwdtrans") or {}
    cpu_count = fw.get("cpu_count") or cpu.get("count")
    items = [
        ("date", data.get("datetime")),
        ("CPU", cpu.get("brand_raw") or info.get("processor") or info.get("machine")),
        ("CPU count", cpu_count),
        ("torch threads", fw.get("torch_threads") or first.get("threads")),
        ("OMP_WAIT_POLICY", fw.get("omp_wait_policy")),
        ("highest 1-minute load average", num(fw.get("max_loadavg_1m"), ".2f").replace("n/a", "")),
        ("torch", fw.get("torch") or first.get("torch")),
        ("python", info.get("python_version")),
        ("fwdtrans", fw.get("fwdtrans") or first.get("fwdtrans")),
        ("device", first.get("device")),
        ("setup", first.get("setup") if len({e.get("setup") for e in extras}) == 1 else None),
        ("commit", (data.get("commit_info") or {}).get("id")),
    ]
    return [(k, v) for k, v in items if v not in (None, "")]


def machine_lines(data: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in machine_items(data)]


def sections(rows: list[dict]) -> list[str]:
    """Markdown for ``rows``: ``test_step_time.py``'s ratio and engine tables, then
    ``test_scaling.py``'s tables (one per width and mode) and the batched-vs-loop quotients."""
    flat = [r for r in rows if r["blocks"] is None]
    lines = []
    if flat:
        lines += ["## Every method family", "",
                  ("Median time of one training step (`compute_gradients`); ratios divide by the medians of "
                   f"`{BACKPROP}` (fwdtrans, guess=global) and `{PLAIN}` (the unconverted model) from the same run. "
                   "The paired ratio is the median over rounds of the step's time over a backprop step timed just "
                   "before it (robust to load that changes during the run)."), "", *ratio_table(flat)]
        engines = engine_table(flat)
        if len(engines) > 2:
            lines += ["", "## Forward engine vs reference engine", "",
                      ("`forward / reference` < 1: forward-mode AD is faster than simulating the same estimator "
                       "with backprop."), "", *engines]
    tables = scaling_tables(rows)
    if tables:
        lines += [*([""] if lines else []), "## Scaling with the number of blocks J", "",
                  ("Median step time over backprop's with the same J, width and mode (eager, or "
                   "`compute_gradients(x, y, compile=True)`: compiled over compiled backprop).")]
        for title, table in tables:
            lines += ["", f"### {title}", "", *table]
        loop = batched_vs_loop(rows)
        if loop:
            lines += ["", *(f"- {line}" for line in loop)]
    return lines


def markdown(data: dict) -> str:
    """The full report: machine info, then :func:`sections`."""
    rows = ratio_rows(data.get("benchmarks", []))
    return "\n".join(["# fwdtrans step time", "", *machine_lines(data), "", *sections(rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--markdown", type=Path, metavar="OUT.md", help="also write the report to this file")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    if not data.get("benchmarks"):
        print(f"{args.json}: no benchmarks (was the run made with --benchmark-enable?)", file=sys.stderr)
        return 1
    text = markdown(data)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
