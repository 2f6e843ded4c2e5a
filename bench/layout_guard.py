"""What keeping the default layout costs a compiled step whose model has a convolution that oneDNN's AVX2
kernels get wrong channels-last (``fwdtrans._engine.faulty_conv``; the Performance page's "AVX2-only CPUs").

Usage:
    python bench/layout_guard.py flagship --rounds 15
    python bench/layout_guard.py backprop --rounds 15

ResNet-18 width 4 (its 4-channel stride-2 shortcut is such a convolution), 4 blocks, CNN heads, batch 64,
one thread, compiled (inductor): the step with the guard against the same model with ``faulty_conv`` set to
``False`` (the layout of before the guard), CPU-time medians of interleaved steps after each one's first
(compiling) call. Run it on a CPU with AVX-512, where the unguarded step is right.
"""

import argparse
import copy
import statistics
import time

import torch

import fwdtrans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", choices=["flagship", "backprop"])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    method = {"guess": "global"} if args.method == "backprop" else {}
    guarded = fwdtrans.convert(fwdtrans.models.resnet18(width=4), x[:2], blocks=4, heads="cnn", **method)
    assert guarded.faulty_conv  # the 4-channel stride-2 shortcut
    unguarded = copy.deepcopy(guarded)
    unguarded.faulty_conv = False
    models = {"guard": guarded, "no guard": unguarded}
    for model in models.values():
        model.compute_gradients(x, y, compile=True)  # compiles
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            tick = time.process_time()
            model.compute_gradients(x, y, compile=True)
            seconds[name].append(time.process_time() - tick)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{args.method}: guard {median['guard'] * 1e3:.0f} ms, no guard {median['no guard'] * 1e3:.0f} ms, "
          f"ratio {median['guard'] / median['no guard']:.2f} ({args.rounds} rounds, 1 thread)")


if __name__ == "__main__":
    main()
