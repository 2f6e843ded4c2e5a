"""Command line: ``fwdtrans train`` (one run) and ``fwdtrans demo`` (three methods side by side)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial

from tqdm import tqdm

from . import _method
from ._errors import FwdTransError
from ._train import TrainConfig, train, write_json

__all__ = ["main"]

DEMO_METHODS = (
    ("backprop", {"target": "global", "guess": "global"}),
    ("forward gradient (global target, local guess, activity)", {"target": "global", "guess": "local"}),
    ("local learning (local target, local guess)", {"target": "local", "guess": "local"}),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwdtrans", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()
    for name, help_ in (("train", "train one configuration"), ("demo", "train backprop, the forward gradient "
                                                                      "and local learning briefly; print a table")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", default=defaults.model, choices=["resnet18"])
        p.add_argument("--width", type=int, default=defaults.width, help="ResNet width (64 = standard)")
        p.add_argument("--blocks", type=int, default=defaults.blocks)
        p.add_argument("--heads", default=defaults.heads, choices=["auto", "cnn", "mlp", "linear"])
        p.add_argument("--head-width", type=int, default=None, help="default: the paper's, scaled by --width/64")
        p.add_argument("--epochs", type=int, default=defaults.epochs if name == "train" else 1)
        p.add_argument("--batch-size", type=int, default=defaults.batch_size)
        p.add_argument("--lr", type=float, default=defaults.lr)
        p.add_argument("--momentum", type=float, default=defaults.momentum)
        p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
        p.add_argument("--no-augment", dest="augment", action="store_false")
        p.add_argument("--seed", type=int, default=defaults.seed)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--data-dir", default=None,
                       help="official CIFAR-10 python folder; default: the 5,000/1,000-image subset shipped inside fwdtrans")
        p.add_argument("--limit", type=int, default=0, help="use only the first N training images")
        p.add_argument("--out", default=None, help="JSON summary path (written atomically)")
        p.add_argument("--compile", action="store_true", help="compile the step with torch.compile (first step: minutes)")
        if name == "train":
            p.add_argument("--target", default=defaults.target, choices=_method.TARGETS)
            p.add_argument("--guess", default=defaults.guess, choices=_method.GUESSES)
            p.add_argument("--space", default=defaults.space, choices=_method.SPACES)
            p.add_argument("--granularity", default=defaults.granularity, choices=_method.GRANULARITY,
                           help="weight space: projection per parameter tensor, per block, or one joint scalar")
            p.add_argument("--tangents", type=int, default=defaults.tangents, help="random guesses per block")
            p.add_argument("--aggregation", default=defaults.aggregation, choices=_method.AGGREGATION)
            p.add_argument("--per-sample", default=defaults.per_sample, choices=_method.PER_SAMPLE)
            p.add_argument("--engine", default=defaults.engine, choices=_method.ENGINES)
            p.add_argument("--streams", default=defaults.streams, choices=_method.STREAMS)
            p.add_argument("--recompute", action="store_true", help="recompute block forwards for the pull-backs")
    return parser


def _config(args: argparse.Namespace, **override) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(override)
    return TrainConfig(**values, extra={"limit": args.limit} if args.limit else {})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bar = partial(tqdm, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        if args.command == "train":
            config = _config(args)
            summary = train(config, out=args.out, progress=bar)
            for e in summary["epochs"]:
                print(f"epoch {e['epoch']}: train loss {e['train_loss']:.4f}  test accuracy {e['test_accuracy']:.2%}")
            print(f"test accuracy {summary['test_accuracy']:.2%} ({summary['seconds_per_step'] * 1000:.0f} ms/step)")
            return 0
        rows = []
        for label, method in DEMO_METHODS:
            print(f"== {label}", file=sys.stderr)
            summary = train(_config(args, **method), progress=bar)
            for e in summary["epochs"]:
                print(f"   epoch {e['epoch']}: train loss {e['train_loss']:.4f}  test accuracy {e['test_accuracy']:.2%}",
                      file=sys.stderr)
            rows.append({**summary, "label": label})
        print(f"\n{'method':<58} {'test acc.':>9} {'ms/step':>8}")
        for r in rows:
            print(f"{r['label']:<58} {r['test_accuracy']:>9.2%} {r['seconds_per_step'] * 1000:>8.0f}")
        if args.out:
            write_json(args.out, {"runs": rows})
        return 0
    except FwdTransError as e:
        print(f"fwdtrans: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
