"""Time of one training step (``converted.compute_gradients(x, y)``, no optimizer).

Setup: ResNet-18 width 16, batch 64 of 3x32x32, 10 classes, 8 blocks, CNN heads width 8, float32,
2 threads, seeded. Each case is timed with ``benchmark.pedantic``: one untimed warm-up call (first
call overheads: allocator, vmap/jvp set-up, lazy initialisation), then ``FWDTRANS_BENCH_ROUNDS``
timed calls (``FWDTRANS_BENCH_SLOW_ROUNDS`` for ``slow`` cases, 20-80 s per step on 2 cores).
Before every round (warm-up included) one fwdtrans backprop step is timed outside the benchmark's
clock: ``paired_ratio_to_backprop`` is the median over rounds of case time / backprop time of the
same round, which follows the machine's load far better than a ratio of medians taken minutes apart.
The smoke run (``--benchmark-disable``) calls the step of every case but the ``slow`` ones once.

Groups:

* ``baselines``: ``plain-backprop`` (the unconverted model), ``backprop`` (fwdtrans
  ``guess="global"``), ``flagship`` (global target, local guess, activity space, forward engine),
  ``local`` (greedy local learning).
* one group per space family (``activity``, ``weight-tensor``, ``weight-block``, ``weight-joint``,
  ``weight-sample``, ``span``): global target x guesses {local, ntk, gaussian} (span: local, ntk) x
  engines {forward, reference}, side by side. ``weight-sample`` (the official code's per-sample weight
  space) runs its forward engine for the local guess only, as a ``slow`` case: one tangent stream per
  sample and parameter tensor (3,456 here) makes it hundreds of times slower than backprop.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import fwdtrans

WIDTH, BATCH, BLOCKS, HEAD_WIDTH, CLASSES, SEED = 16, 64, 8, 8, 10, 0
SETUP = (f"resnet18(width={WIDTH}), batch {BATCH}x3x32x32, {BLOCKS} blocks, CNNHead(width={HEAD_WIDTH}), "
         "float32")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    group: str
    method: dict | None  # convert()'s method keywords; None: the plain, unconverted model
    family: str | None = None  # space family of the matrix cases
    slow: bool = False  # tens of seconds per step: FWDTRANS_BENCH_SLOW_ROUNDS rounds, not in the smoke run


FAMILIES = {  # family -> (space, granularity)
    "activity": ("activity", "tensor"),
    "weight-tensor": ("weight", "tensor"),
    "weight-block": ("weight", "block"),
    "weight-joint": ("weight", "joint"),
    "weight-sample": ("weight", "sample"),
    "span": ("span", "tensor"),
}
GUESSES = ("local", "ntk", "gaussian")
ENGINES = ("forward", "reference")


BACKPROP = dict(target="global", guess="global")


def _cases() -> list[Case]:
    cases = [
        Case("plain-backprop", "baselines", None),
        Case("backprop", "baselines", BACKPROP),
        Case("flagship", "baselines", dict(target="global", guess="local", space="activity", engine="forward")),
        Case("local", "baselines", dict(target="local", guess="local")),
        Case("flagship-recompute", "baselines", dict(target="global", guess="local", space="activity", recompute=True)),
        # 8 blocks balanced over every cut point, including those inside residual blocks
        Case("flagship-multi-tensor", "baselines", dict(target="global", guess="local", space="activity",
                                                        multi_tensor=True)),
    ]
    for family, (space, granularity) in FAMILIES.items():
        for guess in GUESSES:
            if space == "span" and guess not in ("local", "ntk", "fixed-ntk"):
                continue  # span projects on the span of the head guesses
            for engine in ENGINES:
                if granularity == "sample" and engine == "forward" and guess != "local":
                    continue  # one forward-engine case is enough to show its cost
                # slow: the reference engine reads activity/span values per output sample (a batched
                # backward of B cotangents per block: about B times backprop's work), the forward
                # engine in span space propagates B tangent streams per block (448 here; ~15 GB), and
                # per sample and parameter tensor with granularity="sample" (3,456 here)
                slow = space == "span" or (engine == "reference" and space == "activity") or (
                    granularity == "sample" and engine == "forward")
                method = dict(target="global", guess=guess, space=space, granularity=granularity, engine=engine)
                cases.append(Case(f"{family}-{guess}-{engine}", family, method, family, slow))
    return cases


CASES = _cases()


def _param(case: Case):
    marks = [pytest.mark.benchmark(group=case.group)]
    if case.slow:
        marks.append(pytest.mark.slow)
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="session")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return fwdtrans.models.resnet18(num_classes=CLASSES, width=WIDTH).train()


def _convert(model: torch.nn.Module, x: torch.Tensor, method: dict):
    return fwdtrans.convert(model, x[:2], blocks=BLOCKS, heads=fwdtrans.heads.CNNHead(width=HEAD_WIDTH), seed=SEED,
                            **method)


@pytest.fixture(scope="session")
def backprop_step(batch):
    """A timed fwdtrans backprop step, run before every timed round of every case (untimed by the
    benchmark): the paired ratio compares each round with backprop measured seconds before it."""
    x, y = batch
    built = []  # converted on first use: the smoke run never needs it

    def timed() -> float:
        if not built:
            built.append(_convert(_model(), x, BACKPROP))
            built[0].compute_gradients(x, y)  # warm-up
        start = time.perf_counter()
        built[0].compute_gradients(x, y)
        return time.perf_counter() - start

    return timed


def _streams(converted, method) -> int | None:
    """Tangent streams per step, from the Method's stream count (``None`` if the API moved)."""
    names = ("stream_count", "num_streams", "streams")
    count = next((getattr(method, n) for n in names if callable(getattr(method, n, None))), None)
    if count is None:
        return None
    try:
        return int(count(len(converted.blocks), BATCH, [len(list(b.parameters())) for b in converted.blocks]))
    except Exception:  # a bookkeeping figure: never fail a timing because of it
        return None


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_step(benchmark, case: Case, batch, rounds, slow_rounds, backprop_step):
    x, y = batch
    model = _model()
    extra = {"case": case.id, "family": case.family, "setup": SETUP, "torch": torch.__version__,
             "fwdtrans": fwdtrans.__version__, "threads": torch.get_num_threads()}

    if case.method is None:
        params = list(model.parameters())

        def step():
            for p in params:
                p.grad = None
            F.cross_entropy(model(x), y).backward()

        extra.update(method="unconverted model: cross_entropy(model(x), y).backward()", engine="autograd",
                     kind="backprop", tangent_streams=0)
    else:
        with warnings.catch_warnings(record=True) as caught:  # fwdtrans's "propagates N tangent streams"
            warnings.simplefilter("always", UserWarning)  # other categories keep pytest's filters
            converted = _convert(model, x, case.method)
        method = converted.method
        extra.update(
            method=method.describe(), engine=method.engine, kind=method.kind, guess=case.method["guess"],
            # streams the forward engine propagates per step (0: backprop, local, reference engine) ...
            tangent_streams=_streams(converted, method),
            # ... and what the same estimator propagates with the forward engine
            forward_engine_streams=_streams(converted, dataclasses.replace(method, engine="forward")),
            convert_warnings=sorted({str(w.message) for w in caught}),
        )
        assert len(converted.blocks) == BLOCKS

        def step():
            converted.compute_gradients(x, y)

    n = slow_rounds if case.slow else rounds
    extra["rounds"] = n
    benchmark.extra_info.update(extra)
    if benchmark.enabled:  # interleave: one backprop step (untimed by the benchmark) before each round
        times, backprop_times = [], []

        def timed_step():
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)

        benchmark.pedantic(timed_step, setup=lambda: backprop_times.append(backprop_step()), rounds=n,
                           warmup_rounds=1, iterations=1)
        pairs = list(zip(times[-n:], backprop_times[-n:], strict=False))  # the timed rounds, warm-up left out
        benchmark.extra_info.update(
            paired_backprop_median_ms=1e3 * statistics.median(b for _, b in pairs),
            paired_ratio_to_backprop=statistics.median(t / b for t, b in pairs),
        )
    else:  # smoke run: the step once
        benchmark.pedantic(step, rounds=n, warmup_rounds=1, iterations=1)
    if hasattr(os, "getloadavg"):  # > CPU count: other jobs competed with this case
        benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]

    trained = model.parameters() if case.method is None else converted.blocks.parameters()
    grads = [p.grad for p in trained]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{case.id}: missing or non-finite gradient"
