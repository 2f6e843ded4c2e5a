"""The command line: ``fwdtrans train`` (one resumable run), ``fwdtrans study`` (a grid of runs and its
tables) and ``fwdtrans demo`` (three methods side by side).

Every option is a field of :class:`TrainConfig`, or of its :class:`fwdtrans.Method`; the flags, their types,
choices (a ``Literal``'s values) and defaults are generated from them, so the CLI, the config recorded in
a run directory and the Python API agree. ``--version``, ``--help`` and a mistyped command import neither torch
nor the training code: the flags of a command are built only when it is named.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import typing
from functools import partial
from typing import TYPE_CHECKING

import fwdtrans

from .._errors import FwdTransError
from ._schedule import SCHEDULES

if TYPE_CHECKING:
    from ._config import TrainConfig

__all__ = ["main"]

DEMO_METHODS = (
    ("backprop", {"target": "global", "guess": "global"}),
    ("forward gradient (global target, local guess, activity)", {"target": "global", "guess": "local"}),
    ("local learning (local target, local guess)", {"target": "local", "guess": "local"}),
)
# the demo's short schedule: one epoch of the shipped subset per method, annealed to zero
DEMO_DEFAULTS = {"epochs": 1, "batch_size": 64, "schedule": "cosine"}

_COMMANDS = ("train", "demo", "study")
_HELP = {
    "model": "architecture (the paper's CIFAR ResNet-18)",
    "width": "ResNet width (64 = the paper's)",
    "blocks": "number of blocks (8 and 16 are the paper's cuts; 16 drops the skip connections)",
    "heads": "auxiliary head family (auto: within 10%% of each block's FLOPs)",
    "head_width": "head width (default: the paper's, scaled by --width/64)",
    "target": "Gradient Target",
    "guess": "Gradient Guess",
    "space": "projection space",
    "granularity": "weight space: one projection per parameter tensor, per block, one joint scalar, or per sample "
                   "and tensor (the official code's default; best with --engine reference)",
    "tangents": "random guesses per block",
    "aggregation": "how several tangents combine",
    "per_sample": "activity space under train-mode BatchNorm: by-loss, or exact (one stream per sample)",
    "engine": "forward-mode AD, or the same estimator simulated with backprop",
    "streams": "how the forward engine schedules tangent streams",
    "recompute": "recompute block forwards for the pull-backs (less memory)",
    "dataset": "data set, read from --data-dir in its official format",
    "data_dir": "folder of the data set (default: the CIFAR-10 subset shipped with fwdtrans)",
    "limit": "use only the first N training images (0: all)",
    "augment": "the paper's augmentation (random crop, padding 4, and flip; none for Fashion-MNIST)",
    "epochs": "epochs to train (a larger value extends a finished run)",
    "batch_size": "mini-batch size",
    "lr": "initial learning rate (SGD)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "schedule": "learning-rate schedule: step (x gamma every step-size epochs), cosine, or constant",
    "step_size": "step schedule: epochs between decays (default: the paper's, 30; ImageNet32 20)",
    "gamma": "step schedule: decay factor (default: the paper's, 0.2; ImageNet32 0.1)",
    "seed": "seed of the model, data order, augmentation and random guesses",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "threads": "torch CPU threads (default: torch's choice)",
    "compile": "compile the step with torch.compile (the first step takes minutes)",
    "checkpoint_every": "also checkpoint every N steps (0: at the end of each epoch only)",
    "diagnostics_every": "every N steps, record per block cos(guess, target) (Eq. 6) and cos(estimate, true gradient)",
    "tensorboard": "also write TensorBoard scalars to RUN_DIR/tensorboard (needs tensorboard installed)",
    "log_every": "when the output is not a terminal (no progress bar): a progress line every N seconds (0: one line "
                 "per epoch only)",
    "sync_batchnorm": "under torchrun: BatchNorm statistics over every rank's share of the batch (default: each rank "
                      "normalises its own share, as DDP)",
    "dist_timeout": "under torchrun: seconds a rank waits for the others (to join, or in a collective) before it "
                    "stops with an error",
    "probe_epochs": "after training, train fresh heads N epochs on the frozen network's block outputs and record "
                    "their per-block losses (the paper's Figure 2, for methods that train no heads)",
}
_CHOICES = {"model": ("resnet18",), "heads": ("auto", "cnn", "mlp", "linear"), "schedule": SCHEDULES}
_TYPES = {"head_width": int, "step_size": int, "threads": int, "gamma": float, "data_dir": str}


def _literal(hint) -> tuple[str, ...] | None:
    """The values of a ``Literal`` type, also inside a union (``guess``: a name or a callable)."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return next((values for arg in typing.get_args(hint) if (values := _literal(arg))), None)


def _fields() -> list[tuple[str, object, tuple[str, ...] | None]]:
    """(name, default, choices) of every flag: TrainConfig's fields, with the Method's in place of ``method``."""
    from ._config import TrainConfig
    from ._datasets import DATASETS

    choices = {**_CHOICES, "dataset": DATASETS}
    hints = typing.get_type_hints(fwdtrans.Method)
    out: list[tuple[str, object, tuple[str, ...] | None]] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method":
            out += [(m.name, m.default, _literal(hints[m.name])) for m in dataclasses.fields(fwdtrans.Method)]
        else:
            out.append((f.name, f.default, choices.get(f.name)))
    return out


def _add_config_options(parser: argparse.ArgumentParser, *, method: bool, defaults: dict, helps: dict) -> None:
    """One flag per field of TrainConfig and of its Method (``method=False`` leaves out the method's); ``helps``
    replaces some of the flags' help."""
    from ._config import METHOD_KEYS

    helps = {**_HELP, **helps}
    for name, field_default, choices in _fields():
        if name in METHOD_KEYS and not method:
            continue
        default = defaults.get(name, field_default)
        flag = "--" + name.replace("_", "-")
        if name == "augment":
            parser.add_argument("--no-augment", dest="augment", action="store_false",
                                help="turn off " + helps["augment"])
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=helps[name])
        else:
            kind = _TYPES.get(name, type(default))
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=helps[name],
                                metavar=None if choices else name.upper())


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it is ``None`` (its help then says what happens) and for a
    switch (``--compile``: off unless given, ``--no-augment``: on unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help or "" if action.default is None or action.nargs == 0 else super()._get_help_string(action)


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The command line's parser, with the flags of ``command`` alone (``None``: the commands without their flags)."""
    parser = argparse.ArgumentParser(prog="fwdtrans", description="Train with forward gradients (Fournier et al., "
                                     "ICML 2023).", formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"fwdtrans {fwdtrans.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = _Help
    p = sub.add_parser("train", help="train one configuration, resumable with --run-dir", formatter_class=formatter,
                       description="Train one configuration. With --run-dir the run is checkpointed; the same "
                                   "command with the same --run-dir resumes it.")
    d = sub.add_parser("demo", help="train backprop, the forward gradient and local learning briefly; print a table",
                       formatter_class=formatter)
    s = sub.add_parser("study", help="run a grid of runs (a preset of the paper's tables, or a TOML file) and write "
                       "its tables and plots", formatter_class=formatter,
                       description="Run a study: one resumable run directory per cell under --out, then the table "
                                   "(markdown, CSV) beside the paper's numbers, and plots. The same command resumes "
                                   "it.")
    if command is not None:
        {"train": _train_options, "demo": _demo_options, "study": _study_options}[command]({"train": p, "demo": d,
                                                                                            "study": s}[command])
    return parser


def _train_options(p: argparse.ArgumentParser) -> None:
    _add_config_options(p, method=True, defaults={}, helps={})
    p.add_argument("--run-dir", default=None, help="run directory: config.json, metrics.jsonl, checkpoint.pt, "
                   "model.pt, summary.json (default: nothing written)")


def _demo_options(d: argparse.ArgumentParser) -> None:
    _add_config_options(d, method=False, defaults=DEMO_DEFAULTS, helps={"epochs": "epochs to train each method"})
    d.add_argument("--out", default=None, help="JSON file for the table (written atomically)")


def _study_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("preset", nargs="?", default=None, help="a preset (see --list)")
    s.add_argument("--config", default=None, help="a study in a TOML file instead of a preset")
    s.add_argument("--out", default=None, help="the study's folder")
    s.add_argument("--full", action="store_true", help="the preset's full version (mini: more heads, fixed NTK)")
    s.add_argument("--list", action="store_true", help="list the presets with their run counts")
    s.add_argument("--dry-run", action="store_true", help="list the runs with their status and estimated time")
    s.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    s.add_argument("--data-dir", default=None, help="folder holding the data sets in their official layouts "
                   "(cifar-10-batches-py/, cifar-100-python/, fashion-mnist/, Imagenet32_*_npz/); default: the "
                   "CIFAR-10 subset shipped with fwdtrans")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")


def _config(args: argparse.Namespace, **override) -> TrainConfig:
    from ._config import TrainConfig

    names = {name for name, _, _ in _fields()}
    return TrainConfig.from_dict({**{k: v for k, v in vars(args).items() if k in names}, **override})


def _progress():
    """A bar on a terminal; nothing otherwise (a log file gets the per-epoch lines only)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return partial(tqdm, leave=False, dynamic_ncols=True, file=sys.stderr)
    return None


def _log(line: str) -> None:
    print(line, flush=True)


def _rank() -> int | None:
    """This process's rank under torchrun (several processes), else ``None``."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None


def _say(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every rank runs the same command under torchrun)."""
    if not _rank():
        print(*args, **kwargs)


def _study(args: argparse.Namespace) -> int:
    from ._presets import PRESETS, preset
    from ._study import estimate, run_study
    from ._studyspec import cells, load_spec

    if args.list:
        print(f"{'preset':<16} {'runs':>5}  description")
        for name, p in PRESETS.items():
            print(f"{name:<16} {len(cells(p.build(False))):>5}  {p.description}")
        return 0
    if (args.preset is None) == (args.config is None):
        raise FwdTransError("name a preset or pass --config FILE (one of them). Fix: fwdtrans study --list shows the "
                            "presets.")
    if args.out is None:
        raise FwdTransError("--out DIR is needed: the study's runs, tables and plots go there.")
    spec = preset(args.preset, full=args.full) if args.preset else load_spec(args.config)
    options = {"data_dir": args.data_dir, "device": args.device, "threads": args.threads}
    if args.dry_run:
        if not _rank():
            estimate(spec, args.out, log=_log, **options)
        return 0
    run_study(spec, args.out, jobs=args.jobs, log=_log, progress=_progress(), **options)
    _say(f"tables and plots: {args.out}/table.md, table.csv, *.png")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv[0] if argv and argv[0] in _COMMANDS else None).parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a scheduler's SIGTERM = Ctrl-C
    try:
        if args.command == "study":
            return _study(args)
        from ._loop import train
        from ._rundir import write_json

        if args.command == "train":
            summary = train(_config(args), run_dir=args.run_dir, progress=_progress(), log=_log)
            ms = summary["seconds_per_step"]
            _say(f"test accuracy {summary['test_accuracy']:.2%}" + (f" ({ms * 1000:.0f} ms/step)" if ms else ""))
            return 0
        rows = []
        for label, method in DEMO_METHODS:
            _say(f"== {label}", file=sys.stderr)
            summary = train(_config(args, **method), progress=_progress(), log=partial(print, file=sys.stderr))
            rows.append({**summary, "label": label})
        _say(f"\n{'method':<58} {'test acc.':>9} {'ms/step':>8}")
        for r in rows:
            _say(f"{r['label']:<58} {r['test_accuracy']:>9.2%} {r['seconds_per_step'] * 1000:>8.0f}")
        if args.out and not _rank():
            write_json(args.out, {"runs": rows})
        return 0
    except FwdTransError as e:
        rank = _rank()
        print(f"fwdtrans: error{'' if rank is None else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "run_dir", None)
        _say("fwdtrans: interrupted" + (f"; {where} keeps its last checkpoint: run the same command to resume."
                                        if where else "."), file=sys.stderr)  # rank 0 alone, under torchrun
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
