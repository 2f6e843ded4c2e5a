"""On a CUDA GPU: the compiled step equals the eager one, both engines agree, and a training run resumes.

Every test is marked ``cuda`` and skipped without a GPU: ``python -m pytest tests/test_cuda.py -m cuda``
(``bench/gpu_check.py`` runs it so). The quick tests come first; the last two compile a graph each
(the flagship and backprop, about a minute each on a GPU).
"""

import copy
import dataclasses

import pytest
import torch
from models import assert_gradients_match, grads

import fwdtrans
from fwdtrans._method import on_reference
from fwdtrans.app import RunDir, TrainConfig, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() "
                              "is False)"),
]

FLAGSHIP = {"target": "global", "guess": "local", "space": "activity"}
BACKPROP = {"target": "global", "guess": "global"}


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls: TF32 rounds to 10 bits, and eager and compiled code may
    differ in where they use it."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _resnet(device: str, method: dict, dtype=torch.float32, batch: int = 32):
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=8).to(device, dtype)
    x = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    converted = fwdtrans.convert(model, x[:2], blocks=4, heads=fwdtrans.heads.CNNHead(width=4), **method)
    return converted, x, y


def compiled_equals_eager(method: dict, device: str) -> None:
    """One step from identical copies, eager and ``compile=True``: gradients within 1e-3 of each
    other's norm (float32), BatchNorm running statistics and metrics within float32 round-off."""
    eager, x, y = _resnet(device, method)
    compiled = copy.deepcopy(eager)
    m_eager = eager.compute_gradients(x, y)
    m_compiled = compiled.compute_gradients(x, y, compile=True)
    assert all(p.device.type == device for p in compiled.parameters())
    assert_gradients_match(grads(compiled), grads(eager), rtol=1e-3)
    for (name, b), c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)
    assert m_compiled.keys() == m_eager.keys()
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-4, atol=1e-5, msg=k)


def engines_agree(space: str, device: str) -> None:
    """The forward engine and the reference engine (the estimator simulated with backprop) give the
    same gradients in float64."""
    forward, x, y = _resnet(device, {**FLAGSHIP, "space": space}, dtype=torch.float64, batch=8)
    reference = copy.deepcopy(forward)
    reference.method = on_reference(forward.method)
    forward.compute_gradients(x, y)
    reference.compute_gradients(x, y)
    assert all(g is not None for g in grads(forward.blocks).values())
    assert_gradients_match(grads(forward), grads(reference), rtol=1e-8)


def train_and_resume(run_dir, device: str) -> None:
    """A short run on ``device`` with a run directory, then the same run extended to 2 epochs."""
    config = TrainConfig(width=8, blocks=8, heads="cnn", limit=256, batch_size=64, epochs=1, device=device)
    first = train(config, run_dir=str(run_dir))
    assert first["device"].startswith(device) and [e["epoch"] for e in first["epochs"]] == [1]
    second = train(dataclasses.replace(config, epochs=2), run_dir=str(run_dir))
    assert second["device"].startswith(device) and [e["epoch"] for e in second["epochs"]] == [1, 2]
    assert second["epochs"][0] == first["epochs"][0]  # the resumed run kept the first epoch as recorded
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in second["epochs"])
    assert [r["epoch"] for r in RunDir(run_dir).read_metrics()] == [1, 2]
    assert RunDir(run_dir).model.is_file()


@pytest.mark.filterwarnings("ignore:.*tangent streams per step")  # weight space: one stream per tensor
@pytest.mark.parametrize("space", ["activity", "weight"])
def test_forward_and_reference_engines_agree_on_cuda(space):
    engines_agree(space, "cuda")


def test_training_run_on_cuda_resumes(tmp_path):
    train_and_resume(tmp_path / "run", "cuda")


@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")  # inductor's hint on Ampere and later
@pytest.mark.filterwarnings("ignore:Please use the new API settings to control TF32:UserWarning")  # torch 2.9-2.11
@pytest.mark.parametrize("method", [FLAGSHIP, BACKPROP], ids=["flagship", "backprop"])
def test_compiled_step_equals_eager_on_cuda(method, no_tf32):
    compiled_equals_eager(method, "cuda")
