"""A study's report, in the paper's layout, from whatever runs have finished.

Written into the study folder at every invocation of ``fwdtrans study``:

- ``table.md`` and ``table.csv``: rows x columns of the study, each cell the final test accuracy
  (%) as mean ± std over the finished seeds, beside the paper's number; notes: the study's
  setting, the engine of each column, unfinished and failed runs.
- ``accuracy.png`` (test accuracy per epoch, per cell: the paper's Figures 3/6),
  ``cosine.png`` (the per-block cosine between guess and target over training, Eq. 6: Figures
  4/5) and ``local_losses.png`` (per-block local losses at the end of training: Figure 2), when
  matplotlib is installed (``pip install matplotlib``; the tables need nothing).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from ._rundir import RunDir, atomic_write
from ._studyspec import Cell, StudySpec

__all__ = ["collect", "format_table", "write_report"]


def collect(study_cells: list[Cell], out: Path) -> dict[str, dict]:
    """Per cell name: its state, final accuracy (when done), per-epoch records and summary."""
    results = {}
    for cell in study_cells:
        run = RunDir(out / "runs" / cell.name)
        summary = run.read_summary()
        done = summary is not None and summary["config"]["epochs"] == cell.config.epochs
        failed = run.path / "failed.json"
        results[cell.name] = {
            "state": "done" if done else "failed" if failed.is_file() else "unfinished",
            "accuracy": summary["test_accuracy"] if done else None,
            "epochs": run.read_metrics(),
            "summary": summary,
            "error": json.loads(failed.read_text())["error"] if failed.is_file() and not done else None,
        }
    return results


def _cell_text(accuracies: list[float], expected: int) -> str:
    if not accuracies:
        return ""
    values = [100 * a for a in accuracies]
    text = f"{statistics.mean(values):.1f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.1f}"
    return text + (f" ({len(values)}/{expected} runs)" if len(values) < expected else "")


def format_table(spec: StudySpec, study_cells: list[Cell], results: dict[str, dict]) -> tuple[str, str]:
    """The markdown and CSV tables: rows x columns, ours (mean ± std over seeds, %) beside the paper's.

    Example:
        >>> from fwdtrans.app._studyspec import Column, Row, StudySpec, cells
        >>> spec = StudySpec("s", "A study", rows=(Row("BP", {"guess": "global"}, {"A": "94.5 ± 0.2"}),),
        ...                  columns=(Column("A", {}),), seeds=(0, 1))
        >>> runs = cells(spec)
        >>> results = {c.name: {"state": "done", "accuracy": a} for c, a in zip(runs, (0.90, 0.92))}
        >>> print(format_table(spec, runs, results)[0].splitlines()[2])
        | BP | 91.0 ± 1.4 | 94.5 ± 0.2 |
    """
    by_cell: dict[tuple[str, str], list[Cell]] = {}
    for cell in study_cells:
        by_cell.setdefault((cell.row.label, cell.column.label), []).append(cell)
    md = ["| " + " | ".join(["guess", *(x for c in spec.columns for x in (c.label, "paper"))]) + " |",
          "|---" + "|---:" * (2 * len(spec.columns)) + "|"]
    rows_csv = []
    for row in spec.rows:
        cells_md = []
        for column in spec.columns:
            runs = by_cell.get((row.label, column.label), [])
            accuracies = [results[c.name]["accuracy"] for c in runs if results[c.name]["state"] == "done"]
            ours = _cell_text(accuracies, len(runs)) if runs else ("" if row.columns is None else "·")
            paper = row.paper.get(column.label, "")
            cells_md += [ours, paper]
            if runs:
                values = [100 * a for a in accuracies]
                rows_csv.append({
                    "row": row.label, "column": column.label, "runs": len(runs), "finished": len(values),
                    "mean": f"{statistics.mean(values):.2f}" if values else "",
                    "std": f"{statistics.stdev(values):.2f}" if len(values) > 1 else "",
                    "paper": paper, "engine": runs[0].config.method.engine, "epochs": runs[0].config.epochs,
                })
        md.append("| " + " | ".join([row.label, *cells_md]) + " |")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["row", "column", "runs", "finished", "mean", "std", "paper", "engine",
                                                "epochs"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows_csv)
    return "\n".join(md) + "\n", buffer.getvalue()


def _notes(spec: StudySpec, study_cells: list[Cell], results: dict[str, dict]) -> str:
    lines = []
    engines: dict[str, set[str]] = {}
    for cell in study_cells:
        engines.setdefault(cell.column.label, set()).add(cell.config.method.engine)
    lines.append("Engines: " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in engines.items())
                 + " (both compute the same estimates; each cell uses the one measured faster for it).")
    if study_cells:
        c = study_cells[0].config
        data = next((r["summary"]["data"] for r in results.values() if r["summary"]), None)
        size = f"{data['name']}, {data['train']} training / {data['test']} test images" if data else c.dataset
        lines.append(f"Setting: ResNet-18 width {c.width}, {c.epochs} epochs, batch {c.batch_size}, "
                     f"{c.schedule} schedule, {size}; test accuracy after the last epoch, % (mean ± std over seeds).")
    pending = [n for n, r in results.items() if r["state"] == "unfinished"]
    failed = [(n, r["error"]) for n, r in results.items() if r["state"] == "failed"]
    if pending:
        lines.append(f"Not finished yet: {len(pending)} of {len(results)} runs.")
    for name, error in failed:
        lines.append(f"Failed: {name}: {error}")
    if spec.notes:
        lines.append(spec.notes)
    return "\n".join(f"- {line}" for line in lines) + "\n"


def write_report(spec: StudySpec, study_cells: list[Cell], out: Path) -> None:
    """Write ``table.md``, ``table.csv`` and, with matplotlib, the plots, into ``out``."""
    results = collect(study_cells, out)
    md, table_csv = format_table(spec, study_cells, results)
    atomic_write(out / "table.md", f"# {spec.title}\n\n{md}\n{_notes(spec, study_cells, results)}".encode())
    atomic_write(out / "table.csv", table_csv.encode())
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    _plots(study_cells, results, out)


def _labels(cell: Cell) -> str:
    return f"{cell.row.label} / {cell.column.label}"


def _plots(study_cells: list[Cell], results: dict[str, dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    first = [c for c in study_cells if c.seed == min(x.seed for x in study_cells if x.row == c.row
                                                       and x.column == c.column)]
    # test accuracy per epoch (Figures 3/6)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell in first:
        epochs = results[cell.name]["epochs"]
        if epochs:
            ax.plot([e["epoch"] for e in epochs], [100 * e["test_accuracy"] for e in epochs], marker=".",
                    label=_labels(cell))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out / "accuracy.png")

    # cosine between guess and target per block over training (Eq. 6; Figures 4/5)
    curves = [(c, results[c.name]["epochs"]) for c in first
              if any("guess_cosine/block0" in e for e in results[c.name]["epochs"])]
    if curves:
        blocks = max(int(k.split("block")[1]) for _, es in curves for e in es for k in e if k.startswith("guess_cos"))
        shown = sorted({0, blocks // 2, blocks})
        fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5), squeeze=False)
        for ax, j in zip(axes[0], shown, strict=False):
            for cell, es in curves:
                points = [(e["epoch"], e[f"guess_cosine/block{j}"]) for e in es if f"guess_cosine/block{j}" in e]
                if points:
                    ax.plot(*zip(*points, strict=True), marker=".", label=_labels(cell))
            ax.set(xlabel="epoch", title=f"block {j}: cos(guess, target)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        _save(fig, out / "cosine.png")

    # per-block local losses at the end of training (Figure 2): trained heads, else probe heads
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    drawn = False
    for cell in first:
        result = results[cell.name]
        if result["state"] != "done":
            continue
        last, probes = result["epochs"][-1], result["summary"].get("probes", {})
        for ax, split in zip(axes, ("train", "test"), strict=False):
            own = sorted((int(k.split("head")[1]), v) for k, v in last.items() if k.startswith(f"{split}_loss/head"))
            probe = sorted((int(k.split("head")[1]), v) for k, v in probes.items()
                           if k.startswith(f"probe_{split}_loss/head"))
            points = own if own and cell.config.method.trains_heads else probe
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=_labels(cell))
                drawn = True
    for ax, split in zip(axes, ("train", "test"), strict=False):
        ax.set(xlabel="block", ylabel="local loss", title=f"Per-block local {split} loss, end of training")
        ax.grid(alpha=0.3)
    if drawn:
        axes[0].legend(fontsize=7)
        _save(fig, out / "local_losses.png")
    else:
        plt.close(fig)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())

