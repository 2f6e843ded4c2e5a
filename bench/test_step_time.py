"""Time of one training step (``converted.compute_gradients(x, y)``, no optimizer).

Setup: ResNet-18 width 16, batch 64 of 3x32x32, 10 classes, 8 blocks, CNN heads width 8, float32,
2 threads, seeded. Each case is timed with ``benchmark.pedantic``: one untimed warm-up call (first
call overheads: allocator, vmap/jvp set-up, lazy initialisation), then ``FWDTRANS_BENCH_ROUNDS``
timed calls (``FWDTRANS_BENCH_SLOW_ROUNDS`` for ``slow`` cases).

Groups:

* ``baselines``: ``plain-backprop`` (the unconverted model), ``backprop`` (fwdtrans
  ``guess="global"``), ``flagship`` (global target, local guess, activity space, forward engine),
  ``local`` (greedy local learning).
* one group per space family (``activity``, ``weight-tensor``, ``weight-block``, ``weight-joint``,
  ``span``): global target x guesses {local, ntk, gaussian} (span: local, ntk) x engines
  {forward, reference}, side by side.
"""

from __future__ import annotations

import dataclasses
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
    slow: bool = False


FAMILIES = {  # family -> (space, granularity)
    "activity": ("activity", "tensor"),
    "weight-tensor": ("weight", "tensor"),
    "weight-block": ("weight", "block"),
    "weight-joint": ("weight", "joint"),
    "span": ("span", "tensor"),
}
GUESSES = ("local", "ntk", "gaussian")
ENGINES = ("forward", "reference")


def _cases() -> list[Case]:
    cases = [
        Case("plain-backprop", "baselines", None),
        Case("backprop", "baselines", dict(target="global", guess="global")),
        Case("flagship", "baselines", dict(target="global", guess="local", space="activity", engine="forward")),
        Case("local", "baselines", dict(target="local", guess="local")),
    ]
    for family, (space, granularity) in FAMILIES.items():
        for guess in GUESSES:
            if space == "span" and guess not in ("local", "ntk", "fixed-ntk"):
                continue  # span projects on the span of head guesses
            for engine in ENGINES:
                # the reference engine reads activity/span values per output sample: one batched
                # backward of B cotangents per block (B times backprop's work), too slow to smoke-test
                slow = engine == "reference" and space in ("activity", "span")
                method = dict(target="global", guess=guess, space=space, granularity=granularity, engine=engine)
                cases.append(Case(f"{family}-{guess}-{engine}", family, method, family, slow))
    return cases


CASES = _cases()


def _param(case: Case):
    marks = [pytest.mark.benchmark(group=case.group)]
    if case.slow:
        marks.append(pytest.mark.slow)
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return fwdtrans.models.resnet18(num_classes=CLASSES, width=WIDTH).train()


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_step(benchmark, case: Case, batch, rounds, slow_rounds):
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
        with warnings.catch_warnings(record=True) as caught:  # e.g. "propagates N tangent streams"
            warnings.simplefilter("always")
            converted = fwdtrans.convert(model, x[:2], blocks=BLOCKS, heads=fwdtrans.heads.CNNHead(width=HEAD_WIDTH),
                                         seed=SEED, **case.method)
        method = converted.method
        tensors = [len(list(b.parameters())) for b in converted.blocks]
        forward_twin = dataclasses.replace(method, engine="forward")
        extra.update(
            method=method.describe(), engine=method.engine, kind=method.kind, guess=method._guess_name,
            # streams the forward engine propagates per step (0: backprop, local, reference engine) ...
            tangent_streams=method.streams(len(converted.blocks), BATCH, tensors),
            # ... and what the same estimator would propagate with the forward engine
            forward_engine_streams=forward_twin.streams(len(converted.blocks), BATCH, tensors),
            convert_warnings=[str(w.message) for w in caught],
        )
        assert len(converted.blocks) == BLOCKS

        def step():
            converted.compute_gradients(x, y)

    n = slow_rounds if case.slow else rounds
    extra["rounds"] = n
    benchmark.extra_info.update(extra)
    benchmark.pedantic(step, rounds=n, warmup_rounds=1, iterations=1)

    trained = model.parameters() if case.method is None else converted.blocks.parameters()
    grads = [p.grad for p in trained]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{case.id}: missing or non-finite gradient"
