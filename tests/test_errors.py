"""Bad input gets one FwdTransError that names the module and the fix, before training, losing no state."""

import copy

import pytest
import torch
from torch import nn

import fwdtrans
from fwdtrans import FwdTransError


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.gate = Gate()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.gate(self.stem(x)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_untraceable_model_names_module_line_and_escape_hatch():
    with pytest.raises(FwdTransError) as info:
        fwdtrans.convert(Branchy(), torch.randn(2, 4), blocks=2)
    message = str(info.value)
    assert "'gate'" in message and "test_errors.py" in message and "leaf_modules" in message
    # the escape hatch works
    converted = fwdtrans.convert(Branchy(), torch.randn(2, 4), blocks=2, heads="linear", leaf_modules=[Gate])
    assert converted(torch.randn(3, 4)).shape == (3, 3)


def test_too_many_blocks():
    with pytest.raises(FwdTransError, match=r"blocks=40 needs 39 cut points.*at most blocks="):
        fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=40)


def test_unknown_cut_name_lists_the_valid_ones():
    with pytest.raises(FwdTransError, match=r"after 'layer1.0.conv1'.*Valid cut names: .*layer1.0"):
        fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=["layer1.0.conv1"])


def test_cuts_out_of_order():
    with pytest.raises(FwdTransError, match="in the order"):
        fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=["layer2", "layer1"])


def test_model_must_return_logits():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(FwdTransError, match="returns tuple"):
        fwdtrans.convert(Pair(), torch.randn(2, 3))


def test_head_family_that_does_not_fit_the_features():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(FwdTransError, match="needs image features"):
        fwdtrans.convert(model, torch.randn(2, 3), blocks=2, heads="cnn")


def test_labels_out_of_range_lose_no_state():
    converted = fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=2, heads="linear")
    before = copy.deepcopy(converted.state_dict())
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
    with pytest.raises(FwdTransError, match=r"labels must lie in \[0, 10\).*got values in \[0, 12\]"):
        step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 12, 3]))
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nan_loss_does_not_update_parameters_or_statistics():
    converted = fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=2, heads="linear")
    state = copy.deepcopy(converted.state_dict())
    params = [p.detach().clone() for p in converted.parameters()]
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
    x = torch.randn(4, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FwdTransError, match="step was not applied"):
        step(x, torch.tensor([0, 1, 2, 3]))
    assert all(torch.equal(a, b) for a, b in zip(params, converted.parameters(), strict=True))
    for name, value in converted.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, state[name]), name


def test_guess_callable_with_the_wrong_shape():
    converted = fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=2,
                                 heads="linear", guess=lambda j, h, y: torch.zeros(3))
    with pytest.raises(FwdTransError, match="guess callable returned shape"):
        converted.compute_gradients(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))


def test_recompute_refuses_blocks_with_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(FwdTransError, match=r"recompute=True.*dropout.*Fix: recompute=False"):
        fwdtrans.convert(model, torch.randn(2, 4), blocks=3, heads="linear", recompute=True)
    with pytest.raises(FwdTransError, match="recompute=True re-runs"):
        fwdtrans.convert(model, torch.randn(2, 4), blocks=3, heads="linear", recompute=True, space="weight")


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="joint"), "granularity='joint' applies to space='weight'"),
    (dict(space="span", granularity="sample"), "granularity='sample' applies to space='weight'"),
    (dict(aggregation="project"), "aggregation='project' combines several random guesses: guess='local'"),
    (dict(space="weight", granularity="joint", guess="gaussian", aggregation="project"), "with a joint unit"),
    (dict(space="weight", granularity="sample", guess="gaussian", aggregation="project"),
     "granularity='sample' projects each sample's share"),
    (dict(guess="global", engine="reference"), r"guess='global' \(backprop\) projects nothing: engine='reference'"),
    (dict(target="local", guess="local", per_sample="exact", streams="sequential"),
     r"\(local learning\) projects nothing: per_sample='exact', streams='sequential' apply"),
    (dict(guess="gaussian", streams="sequential", engine="reference"), "streams='sequential' schedules"),
    (dict(target="local", guess="gaussian", streams="sequential"), "streams='sequential' schedules"),
])
def test_options_the_method_would_ignore_are_refused(kwargs, match):
    with pytest.raises(FwdTransError, match=match):
        fwdtrans.Method(**kwargs)


def test_check_runs_a_forward_engine_only_method_on_the_reference_engine():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for options in (dict(streams="sequential"), dict(recompute=True)):
        converted = fwdtrans.convert(model, x, blocks=3, heads="linear", **options)
        assert fwdtrans.check(converted, (x, y)).ok, options
