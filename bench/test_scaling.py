"""Step time of every method family against backprop as the number of blocks J grows, eager and compiled.

Setup: ResNet-18 at width 16 or 64, batch 64 of 3x32x32, 10 classes, CNN heads width 8, float32,
2 threads, seeded. J=4: ``blocks=4``; J=8: ``blocks=model.paper_cuts()``; J=16: the network without
skip connections, ``resnet18(skip=False)``, with ``blocks=model.paper_cuts()``. ``eager`` cases time
``converted.compute_gradients(x, y)``, ``compiled`` ones ``compute_gradients(x, y, compile=True)``
(``torch.compile(fullgraph=True)`` of the whole gradient computation). Each case is timed with
``benchmark.pedantic``: one untimed warm-up call (it pays the compilation), then
``FWDTRANS_BENCH_ROUNDS`` timed calls; the median is divided by the median of ``backprop`` with the
same J, width and mode (``extra_info["ratio_to_backprop"]``, see ``conftest.py``). ``flagship-sequential``
(J=8, width 16, eager) is the flagship's estimator pushed one stream at a time: flagship over it is
batched streams over a loop of per-block JVPs.

Width-64 and compiled cases are ``slow``: not in the smoke run. ``FWDTRANS_BENCH_DEVICE=cuda`` runs
on the GPU (every timed call ends with ``torch.cuda.synchronize()``).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fwdtrans

BATCH, HEAD_WIDTH, CLASSES, SEED = 64, 8, 10, 0
DEVICE = os.environ.get("FWDTRANS_BENCH_DEVICE", "cpu")
JS, WIDTHS, MODES = (4, 8, 16), (16, 64), ("eager", "compiled")
FLAGSHIP = {"target": "global", "guess": "local", "space": "activity"}
METHODS = {
    "backprop": {"target": "global", "guess": "global"},
    "flagship": FLAGSHIP,
    "joint": {**FLAGSHIP, "streams": "joint"},
    "weight-block": {"target": "global", "guess": "local", "space": "weight", "granularity": "block"},
    "local": {"target": "local", "guess": "local"},
}
SEQUENTIAL = {**FLAGSHIP, "streams": "sequential"}  # the loop of per-block JVPs, J=8 width 16 eager only


def _params():
    for width in WIDTHS:
        for mode in MODES:
            marks = [pytest.mark.benchmark(group=f"scaling-width{width}-{mode}")]
            if width != 16 or mode == "compiled":
                marks.append(pytest.mark.slow)
            for j in JS:
                cases = dict(METHODS)
                if (j, width, mode) == (8, 16, "eager"):
                    cases["flagship-sequential"] = SEQUENTIAL
                for case, method in cases.items():
                    yield pytest.param(j, width, mode, case, method, id=f"J{j}-w{width}-{mode}-{case}", marks=marks)


@pytest.fixture(scope="session")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("FWDTRANS_BENCH_DEVICE=cuda, but torch.cuda.is_available() is False")
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("j, width, mode, case, method", list(_params()))
def test_scaling(benchmark, j, width, mode, case, method, batch, rounds):
    x, y = batch
    if mode == "compiled":
        torch._dynamo.reset()  # fresh compile caches: no recompile limit carried over from earlier cases
    torch.manual_seed(SEED)
    model = fwdtrans.models.resnet18(num_classes=CLASSES, width=width, skip=j != 16).train().to(DEVICE)
    cuts = j if j == 4 else model.paper_cuts()
    with warnings.catch_warnings(record=True) as caught:  # fwdtrans's "propagates N tangent streams"
        warnings.simplefilter("always", UserWarning)  # other categories keep pytest's filters
        converted = fwdtrans.convert(model, x[:2], blocks=cuts, heads=fwdtrans.heads.CNNHead(width=HEAD_WIDTH),
                                     seed=SEED, **method)
    assert len(converted.blocks) == j
    kwargs = {"compile": True} if mode == "compiled" else {}
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    info = converted.method
    benchmark.extra_info.update(
        case=case, blocks=j, width=width, mode=mode, device=device, rounds=rounds,
        setup=(f"resnet18(width={width}{', skip=False' if j == 16 else ''}), batch {BATCH}x3x32x32, {j} blocks "
               f"({'blocks=4' if j == 4 else 'paper_cuts()'}), CNNHead(width={HEAD_WIDTH}), float32, {mode}, {device}"),
        method=info.describe(), engine=info.engine, kind=info.kind, guess=method["guess"],
        tangent_streams=info.stream_count(j, BATCH, [len(list(b.parameters())) for b in converted.blocks]),
        convert_warnings=sorted({str(w.message) for w in caught}),
        torch=torch.__version__, fwdtrans=fwdtrans.__version__, threads=torch.get_num_threads(),
    )

    def step():
        converted.compute_gradients(x, y, **kwargs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    if hasattr(os, "getloadavg"):  # > CPU count: other jobs competed with this case
        benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]
    grads = [p.grad for p in converted.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{case}: missing or non-finite gradient"
