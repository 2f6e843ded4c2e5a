"""Copy a finished study's small result files into the docs, for the Results page.

    python scripts/publish_study.py STUDY_DIR docs/results/mini

copies ``study.json``, ``table.md``, ``table.csv``, the plots and, per run, ``config.json``,
``metrics.jsonl`` and ``summary.json`` (not the checkpoints nor the weights), so that the page and
its tests are built from committed files and ``make test`` never reruns the study.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

STUDY_FILES = ("study.json", "table.md", "table.csv", "accuracy.png", "cosine.png", "local_losses.png")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the folder that fwdtrans study --out wrote")
    parser.add_argument("dest", type=Path, help="where to copy the files (replaced)")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    for name in STUDY_FILES:
        if (args.study / name).is_file():
            shutil.copy2(args.study / name, args.dest / name)
    for run in sorted((args.study / "runs").iterdir()):
        (args.dest / "runs" / run.name).mkdir(parents=True)
        for name in RUN_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, args.dest / "runs" / run.name / name)
    print(f"copied {args.study} -> {args.dest}")


if __name__ == "__main__":
    main()
