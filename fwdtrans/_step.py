"""One step of a converted model, as ``Converted`` and ``check`` run it: the checks that refuse a bad step
before any work, the engine's step on the model's plan (eager or compiled, single process or data parallel),
and the gradients, buffers and counters written back."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import _distributed, _engine
from ._blocks import as_inputs
from ._cuts import ModalBlock
from ._engine import Plan
from ._errors import FwdTransError
from ._method import Method
from ._support import attention_context
from ._trace import leaves

__all__ = ["Inputs", "Stepped", "check_compile", "check_optimizer", "check_step", "compiled_step", "count_batches",
           "named_leaves", "run", "write_gradients"]

Inputs = Tensor | tuple | list | Mapping  # one tensor, the inputs of a model with several, or a dict input


class Stepped(Protocol):
    """What a step reads and writes of the converted model (``Converted`` is one)."""

    blocks: nn.ModuleList
    method: Method
    generator: torch.Generator
    math_attention: bool
    counters: tuple[str, ...]
    num_classes: int
    input_names: tuple[str, ...]
    input_spec: dict[str, tuple[tuple[int, ...], torch.dtype | None] | None]
    training: bool
    _compiled: dict[str, Callable]

    @property
    def plan(self) -> Plan: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                      ) -> Iterator[tuple[str, Tensor]]: ...

    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True
                      ) -> Iterator[tuple[str, nn.Module]]: ...

    def get_submodule(self, target: str) -> nn.Module: ...


def run(model: Stepped, x: Inputs, y: Tensor, *, record: dict | None = None,
               compile: bool | Mapping = False, reduce: _distributed.Reducer | None = None) -> dict[str, Tensor]:
    """The step without the checks: writes ``p.grad`` (old gradients cleared) and the buffers (unless the
    loss is not finite); returns detached metrics. ``record`` receives the engine's per-block internals;
    ``reduce``: a data-parallel step's reductions (``_distributed``). Every step (either engine's, ``check``'s)
    runs on the attention kernel ``convert`` chose."""
    with attention_context(model.math_attention):
        for p in model.parameters():
            p.grad = None
        plan = model.plan
        batch = y.shape[0]
        if reduce is None:
            noise = _engine.before_step(plan, batch, model.generator)
        else:
            plan = dataclasses.replace(plan, reduce=reduce)
            noise = reduce.draw(plan, batch, model.generator, y)
        if compile:
            compiled = compiled_step(model, compile if isinstance(compile, Mapping) else None)
            assert isinstance(compiled, functools.partial)
            fn = functools.partial(compiled.func, plan)  # this step's plan (a data-parallel step's reductions)
            _engine.before_compiled_step(plan, as_inputs(x))
        else:
            fn = functools.partial(_engine.gradients, plan, record=record)
        with torch.no_grad(), (reduce.step(batch) if reduce is not None else contextlib.nullcontext()):
            grads, buffers, metrics = fn(as_inputs(x), y, noise)  # torch.func transforms differentiate on their own
            if reduce is not None:
                grads, buffers, metrics = reduce.finish(grads, buffers, metrics)
            write_gradients(model, grads)
            if torch.isfinite(metrics["loss"]):  # a non-finite step leaves the running statistics as they were
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
                count_batches(model)
        return metrics


def write_gradients(model: Stepped, grads: Mapping[str, Tensor]) -> None:
    """``p.grad`` from the engine's gradients by name; a parameter that several blocks use (one object under
    each block's name) gets the sum of its uses' gradients (the docs' Methods page)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        g = grads.get(name)
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def count_batches(model: Stepped) -> None:
    """Count a train-mode batch in the ``num_batches_tracked`` of the BatchNorms traced through, as their
    forward does in Python (which no traced graph carries)."""
    with torch.no_grad():
        for name in model.counters:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if module.training:
                getattr(module, attr).add_(1)


def check_step(model: Stepped, inputs: tuple, y: Tensor, allow_eval: bool) -> None:
    """Refuse, before any work, a step that would fail inside the engine or silently train the wrong thing."""
    if not model.training and not allow_eval:
        raise FwdTransError(
            "the converted model is in eval mode: BatchNorm would normalise with its frozen running statistics "
            "and dropout would be off (convert keeps the original model's mode). Fix: converted.train() before "
            "training, or allow_eval=True to train in eval mode on purpose."
        )
    for j, block in enumerate(model.blocks):
        if not isinstance(block, ModalBlock):  # one graph serves both modes
            continue
        mixed = next((n for n, m in block.named_modules() if m.training != block.training), None)
        if mixed is not None:
            raise FwdTransError(
                f"block {j} is in {'train' if block.training else 'eval'} mode but its module '{mixed}' is not: "
                "the block traces layers whose arguments depend on the mode (F.batch_norm(..., model.training)), "
                "so it runs one graph per mode, for the whole block. Fix: set the mode on the converted model "
                "(converted.train() / converted.eval()) or on a whole block."
            )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if torch.is_autocast_enabled(device.type):
        raise FwdTransError(
            f"the step runs under torch.autocast({device.type!r}, {torch.get_autocast_dtype(device.type)}), "
            "which torch.func.jvp does not support (its tangents keep the parameters' dtype while autocast "
            "lowers the primals', and the op fails), and low precision would blur the directional derivatives "
            "anyway. Fix: call the step outside torch.autocast (autocast the evaluation only)."
        )
    batch = check_inputs(model, inputs, param)
    if not isinstance(y, Tensor) or y.dtype != torch.long or y.dim() != 1 or y.shape[0] != batch:
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise FwdTransError(f"labels must be an int64 vector of length {batch}, got {got}.")
    if batch == 0:
        raise FwdTransError("the batch is empty (0 samples): there is no loss to train on. "
                            "Fix: skip empty batches (e.g. DataLoader(..., drop_last=True)).")
    if int(y.min()) < 0 or int(y.max()) >= model.num_classes:
        raise FwdTransError(
            f"labels must lie in [0, {model.num_classes}) (the model outputs {model.num_classes} classes), "
            f"got values in [{int(y.min())}, {int(y.max())}]. Fix: remap the labels or change the model's output "
            "size."
        )
    if batch == 1:
        norm = next((n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     and m.training), None)
        if norm is not None:
            raise FwdTransError(
                f"a batch of 1 sample: BatchNorm '{norm}' (train mode) normalises each batch with its own "
                "statistics and cannot do so from one sample. Fix: use batches of at least 2 samples (e.g. "
                "DataLoader(..., drop_last=True) when the last batch would hold 1)."
            )


def check_inputs(model: Stepped, inputs: tuple, param: Tensor | None) -> int:
    """Compare ``inputs`` with the example inputs' per-sample shapes, dtypes and device; return the batch size."""
    param_dtype = param.dtype if param is not None else torch.get_default_dtype()
    expected = {p: None if v is None else (v[0], v[1] or param_dtype) for p, v in model.input_spec.items()}
    got = named_leaves(inputs, model.input_names)
    if len(inputs) != len(model.input_names) or got.keys() != expected.keys():
        raise FwdTransError(
            f"the inputs do not match the example inputs given to convert: expected {_describe(expected)}; got "
            f"{_describe(got)}. Fix: pass the inputs of a model with several as a tuple, step((a, b), y), and a "
            "dict input as a dict with the example's keys."
        )
    for path, spec in expected.items():
        leaf = got[path]
        if spec is None:  # not a tensor in the example inputs: passed on as given
            continue
        shape, dtype = spec
        if not isinstance(leaf, Tensor):
            fix = f"torch.as_tensor({path})"
        elif leaf.dtype == torch.uint8 and dtype.is_floating_point:
            fix = f"{path}.float() / 255, normalised as in training"
        elif leaf.dtype != dtype:
            fix = f"{path}.to({dtype})"
        elif leaf.shape[1:] != shape:
            fix = f"pass {path} with per-sample shape {shape}, or convert the model with such example inputs"
        elif param is not None and leaf.device != param.device:
            fix = f"{path}.to({str(param.device)!r}), the model's device"
        else:
            continue
        raise FwdTransError(f"input {path} is {_show(leaf)}, but the model was converted for {_show(spec)} "
                            f"(any batch size N). Fix: {fix}.")
    return next((t.shape[0] for t in got.values() if isinstance(t, Tensor) and t.dim()), 0)


def compiled_step(model: Stepped, options: Mapping | None = None) -> Callable:
    """The step's gradient function ``(inputs, y, noise) -> (grads, buffers, metrics)``, the engine's
    ``gradients`` on this model's plan under ``torch.compile(..., fullgraph=True, dynamic=False, **options)``,
    the plan's inductor options (``_engine.inductor_options``) under ``options``'s own; built once per
    ``options`` (torch recompiles it when the method, shapes or dtypes change)."""
    plan = model.plan
    options = dict(options or {})
    if options.get("backend", "inductor") == "inductor":  # the step's inductor options, then the caller's
        mode = options.pop("mode", None)  # torch.compile takes a mode or options, not both: the mode's options
        from torch._inductor import list_mode_options  # (imports the compiler: not before it is needed)

        inductor = {**(list_mode_options(mode) if mode else {}),
                    **_engine.inductor_options(plan), **options.pop("options", {})}
        options.update({"options": inductor} if inductor else {})
    key = repr(sorted(options.items()))  # options may nest dicts: unhashable
    _engine.check_compilable(plan)
    if key not in model._compiled:
        # dynamo keeps one cache (at most torch._dynamo.config.recompile_limit graphs) per code
        # object, and equal code objects share it: give each model's step a code object of its own
        fn = _engine.gradients
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(model):x}")
        own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
        # compile the function itself: torch.compile wraps other callables (a partial) in one shared frame
        model._compiled[key] = torch.compile(own, fullgraph=True, **{"dynamic": False, **options})
    return functools.partial(model._compiled[key], plan)


def check_optimizer(model: Stepped, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that holds none of the trained parameters; warn when it misses some."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise FwdTransError(f"train_step needs a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                            "Fix: converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05)).")
    held = {id(p) for group in groups for p in group["params"]}
    trained = [(n, p) for n, p in model.named_parameters()
               if p.requires_grad and (n.startswith("blocks.") or model.method.trains_heads)]
    missing = [n for n, p in trained if id(p) not in held]
    if trained and len(missing) == len(trained):
        raise FwdTransError(
            f"the optimizer holds none of the {len(trained)} parameters that this model trains"
            f"{' (it holds those of another module: the original model? convert works on a copy)' if held else ''}"
            ", "
            "so a step would change nothing. Fix: build it from the converted model: "
            "torch.optim.SGD(converted.parameters(), ...)."
        )
    if missing:
        heads = all(n.startswith("heads.") for n in missing)
        warnings.warn(
            f"the optimizer holds {len(trained) - len(missing)} of the {len(trained)} parameters that this model "
            f"trains; {'the heads (the method trains them): ' if heads else ''}{', '.join(missing[:6])}"
            f"{f', ... ({len(missing)} in all)' if len(missing) > 6 else ''} get gradients but never change. "
            "Fix: build the optimizer from converted.parameters(), or freeze them with requires_grad_(False).",
            UserWarning, stacklevel=3,
        )


def named_leaves(inputs: tuple, names: tuple[str, ...]) -> dict[str, object]:
    """The inputs' leaves by path, under the forward argument names: ``{"x": ...}``, ``{"batch['image']": ...}``."""
    names = (*names, *(f"extra input {i}" for i in range(len(names), len(inputs))))
    return {path: leaf for name, arg in zip(names, inputs, strict=False) for path, leaf in leaves(arg, name)}


def _show(value: object) -> str:
    """``float32 (8, 3, 32, 32)`` for a tensor, ``float32 (N, 3, 32, 32)`` for a per-sample ``(shape, dtype)``."""
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"{str(value[1]).removeprefix('torch.')} (N{''.join(f', {d}' for d in value[0])})"
    return "anything" if value is None else f"a {type(value).__module__}.{type(value).__qualname__}" + (
        f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else "")


def check_compile(compile: object) -> None:
    if not isinstance(compile, (bool, Mapping)):
        raise FwdTransError(f"compile={compile!r} is neither a bool nor a mapping of torch.compile options. Fix: "
                            "compile=True, compile=False, or compile={'mode': ...} (torch.compile's keywords).")


def _describe(leaves_by_path: Mapping[str, object]) -> str:
    return ", ".join(f"{path}: {_show(v)}" for path, v in leaves_by_path.items()) or "no inputs"
