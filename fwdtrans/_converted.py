"""``convert``: turn any traceable model into a chain of blocks with auxiliary heads."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _distributed, _engine
from ._blocks import as_inputs
from ._check import check
from ._cost import of_blocks
from ._cuts import ModalBlock, block_costs, choose_cuts, split
from ._engine import Plan
from ._errors import FwdTransError
from ._method import Aggregation, Cost, Engine, Granularity, GuessOption, Method, PerSample, SpaceName, Streams, Target
from ._support import attention_context, check_forward_ad, check_recompute, fused_rnn_free, random_blocks
from ._trace import Traced, leaves, original_target, preserved_state, trace
from .heads import HeadSpec, build_cut_head, check_head, check_head_keys

__all__ = ["Converted", "convert"]

Inputs = Tensor | tuple | list | Mapping  # one tensor, the inputs of a model with several, or a dict input


class Converted(nn.Module):
    """A model cut into blocks, each but the last with an auxiliary head.

    ``converted(x)`` computes what the original ``model(x)`` computed (``converted(a, b)`` for a model with
    several inputs). Parameters live in ``blocks.{j}.<original name>`` and ``heads.{j}.*``;
    [`original_name`][fwdtrans.Converted.original_name] and
    [`original_state_dict`][fwdtrans.Converted.original_state_dict] map them back to the original model's names.

    A step checks, cheaply, that its inputs match the example inputs given to ``convert`` (per-sample
    shape, dtype, device; any batch size of at least 1) and that the model is in train mode.

    ``converted.cost`` is the step's predicted cost ([`fwdtrans.Cost`][fwdtrans.Cost]: tangent streams, and
    each engine's time in forward passes) at the batch size of ``convert``'s example inputs;
    [`fwdtrans.inspect`][fwdtrans.inspect] with ``method=`` and ``batch=`` gives it for another batch size.

    Examples:
        >>> import torch, fwdtrans
        >>> model = fwdtrans.models.resnet18(width=8)
        >>> converted = fwdtrans.convert(model, (torch.randn(2, 3, 32, 32),), blocks=4, heads="linear")
        >>> step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05))
        >>> metrics = step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> sorted(metrics)[:2]
        ['accuracy', 'loss']
    """

    def __init__(self, blocks: Sequence[nn.Module], heads: Sequence[nn.Module], cut_names: Sequence[str],
                 method: Method, num_classes: int, seed: int = 0,
                 crossing_shapes: tuple[tuple[tuple[int, ...], ...], ...] = ()):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.cut_names = tuple(cut_names)
        self.method = method
        self.num_classes = num_classes
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # random guesses and NTK re-initialisation
        self.sync_batchnorm = False  # data parallel: BatchNorm statistics over the process group (convert sets it)
        self.math_attention = False  # set by convert when the flash attention kernel lacks forward AD
        self.dropout = (False,) * len(blocks)  # per block: whether it draws random masks; set by convert
        self.crossing_shapes = tuple(crossing_shapes)  # per cut: per-sample shapes of the tensors crossing it
        self.cost: Cost | None = None  # one step's predicted cost per engine, at the example batch; set by convert
        self.renamed: dict[str, str] = {}  # top-level names of the original model renamed in the blocks (_trace)
        self.original_keys: tuple[str, ...] = ()  # the original model's state dict keys; set by convert
        self.unused: dict[str, Tensor] = {}  # its entries that the traced graph never reads
        self.aliases: dict[str, str] = {}  # its keys of a tensor that the graph reads under another key (tied)
        self.input_names: tuple[str, ...] = ()  # forward's argument names, set by convert
        # per tensor leaf of the example inputs: per-sample shape and dtype (None: the parameters' dtype)
        self.input_spec: dict[str, tuple[tuple[int, ...], torch.dtype | None] | None] = {}
        self.counters: tuple[str, ...] = ()  # num_batches_tracked of BatchNorms traced through (set by convert)
        self.reducers: dict[tuple[int, bool], _distributed.Reducer] = {}  # data parallel: per group, the reductions
        self._compiled: dict[str, Callable] = {}
        # a convolution that oneDNN's AVX2 kernels get wrong channels-last: compiled steps keep the default layout
        self.faulty_conv = _engine.faulty_conv([*blocks, *heads])

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        """Per cut: the per-sample sizes of the tensors crossing it (packed in that order)."""
        return _engine.segments(self.crossing_shapes)

    @property
    def cut_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per cut: the per-sample shape of the block output (one tensor, or ``(D,)`` when packed)."""
        return _engine.cut_shapes(self.crossing_shapes)

    @property
    def plan(self) -> Plan:
        """What the engine reads of this model for a step: blocks, heads, method, cuts' shapes, dropout, and
        whether a convolution must keep the default layout."""
        return Plan(tuple(self.blocks), tuple(self.heads), self.method, self.crossing_shapes, self.dropout,
                    faulty_conv=self.faulty_conv)

    def _apply(self, fn: Callable, recurse: bool = True) -> Converted:  # keep the generator on the parameters' device
        result = super()._apply(fn, recurse)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        if self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return result

    def forward(self, *inputs: Tensor) -> Tensor:
        h = self.blocks[0](*inputs)
        for block in self.blocks[1:]:
            h = block(h)
        self._count_batches()
        return h

    def _count_batches(self) -> None:
        """Count a train-mode batch in the ``num_batches_tracked`` of the BatchNorms traced through, as their
        forward does in Python (which no traced graph carries)."""
        with torch.no_grad():
            for name in self.counters:
                owner, _, attr = name.rpartition(".")
                module = self.get_submodule(owner)
                if module.training:
                    getattr(module, attr).add_(1)

    def original_name(self, name: str) -> str:
        """``'blocks.1.layer1.0.conv1.weight'`` -> ``'layer1.0.conv1.weight'``; head names are kept."""
        parts = name.split(".", 2)
        return original_target(parts[2], self.renamed) if parts[0] == "blocks" else name

    def original_state_dict(self) -> dict[str, Tensor]:
        """The model's state under the original model's names (heads left out), loadable by the
        original model. Entries the traced graph never reads are carried along unchanged."""
        own = {self.original_name(k): v for k, v in self.state_dict().items() if k.startswith("blocks.")}
        own.update({alias: own[k] for alias, k in self.aliases.items()})
        return {k: own[k] if k in own else self.unused[k] for k in self.original_keys}

    def load_original_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a checkpoint of the original model into the blocks."""
        own = {self.original_name(k): k for k in self.state_dict() if k.startswith("blocks.")}
        missing = sorted(set(self.original_keys) - set(state))
        unexpected = sorted(set(state) - set(self.original_keys))
        if missing or unexpected:
            raise FwdTransError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                                "Fix: load a checkpoint of the model that was converted.")
        ours = self.state_dict()
        for k, v in state.items():
            if k in own and isinstance(v, Tensor) and ours[own[k]].shape != v.shape:
                raise FwdTransError(f"state dict: '{k}' has shape {tuple(v.shape)}, the converted model's "
                                    f"{tuple(ours[own[k]].shape)}. Fix: load a checkpoint of the model that was "
                                    "converted (same widths and classes).")
        self.load_state_dict({own[k]: v for k, v in state.items() if k in own}, strict=False)
        self.unused = {k: v.detach().clone() for k, v in state.items() if k not in own and k not in self.aliases}

    def compute_gradients(self, x: Inputs, y: Tensor, *, compile: bool | Mapping = False,
                          allow_eval: bool = False, process_group: Any = None, distributed: bool | None = None,
                          sync_batchnorm: bool | None = None) -> dict[str, Tensor]:
        """Write the method's gradient into ``p.grad`` of every trained parameter; return metrics.

        Under ``torch.distributed`` (torchrun) each rank passes its own share of the batch and every rank gets
        the gradients and metrics of the whole batch (see the docs' "Scaling out" page for what is reduced,
        per method, and the few estimators that are computed per rank).

        Args:
            x: the model's input, as in ``convert``'s example inputs: a tensor, a tuple of the inputs of a
                model with several (``forward(a, b)``: ``(a, b)``), or a dict (``forward(batch)``).
            y: int64 labels ``(N,)``.
            compile: see [`train_step`][fwdtrans.Converted.train_step].
            allow_eval: step a model in eval mode (BatchNorm then normalises with its frozen running
                statistics); refused otherwise.
            process_group: reduce over this ``torch.distributed`` group rather than the default one.
            distributed: ``None`` (default): reduce over the group whenever ``torch.distributed`` is initialised
                and the group has several ranks; ``False``: a single-process step on this rank's batch;
                ``True``: require a group.
            sync_batchnorm: BatchNorm statistics over the whole group (``torch.nn.SyncBatchNorm``'s semantics;
                every rank must pass batches of the same size); ``None``: ``convert``'s ``sync_batchnorm``.

        Returns:
            Detached 0-d tensors: ``loss`` (global loss), ``accuracy``, and ``loss/head{j}`` for the heads
            that were run.

        Examples:
            >>> import torch, fwdtrans
            >>> class TwoInputs(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.a, self.b, self.fc = torch.nn.Linear(4, 8), torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)
            ...     def forward(self, a, b):
            ...         return self.fc(torch.relu(self.a(a) + self.b(b)))
            >>> converted = fwdtrans.convert(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 3)), blocks=2)
            >>> metrics = converted.compute_gradients((torch.randn(8, 4), torch.randn(8, 3)), torch.randint(0, 2, (8,)))
        """
        _check_compile(compile)
        inputs = as_inputs(x)
        self._check_step(inputs, y, allow_eval)
        reduce = _distributed.resolve(self, process_group, distributed, sync_batchnorm, bool(compile))
        return self._gradients(inputs, y, compile=compile, reduce=reduce)

    def _gradients(self, x: Inputs, y: Tensor, *, record: dict | None = None,
                   compile: bool | Mapping = False, reduce: _distributed.Reducer | None = None) -> dict[str, Tensor]:
        """The step without the checks: writes ``p.grad`` (old gradients cleared) and the buffers (unless the
        loss is not finite); returns detached metrics. ``record`` receives the engine's per-block internals;
        ``reduce``: a data-parallel step's reductions (``_distributed``). Every step (either engine's, ``check``'s)
        runs on the attention kernel ``convert`` chose."""
        with attention_context(self.math_attention):
            for p in self.parameters():
                p.grad = None
            plan = self.plan
            batch = y.shape[0]
            if reduce is None:
                noise = _engine.before_step(plan, batch, self.generator)
            else:
                plan = dataclasses.replace(plan, reduce=reduce)
                noise = reduce.draw(plan, batch, self.generator, y)
            if compile:
                compiled = self.compiled_gradients(compile if isinstance(compile, Mapping) else None)
                assert isinstance(compiled, functools.partial)
                fn = functools.partial(compiled.func, plan)  # this step's plan (a data-parallel step's reductions)
                _engine.before_compiled_step(plan, as_inputs(x))
            else:
                fn = functools.partial(_engine.gradients, plan, record=record)
            with torch.no_grad(), (reduce.step(batch) if reduce is not None else contextlib.nullcontext()):
                grads, buffers, metrics = fn(as_inputs(x), y, noise)  # torch.func transforms differentiate on their own
                if reduce is not None:
                    grads, buffers, metrics = reduce.finish(grads, buffers, metrics)
                self._write_gradients(grads)
                if torch.isfinite(metrics["loss"]):  # a non-finite step leaves the running statistics as they were
                    for name, b in self.named_buffers():
                        if name in buffers:
                            b.copy_(buffers[name])
                    self._count_batches()
            return metrics

    def _write_gradients(self, grads: Mapping[str, Tensor]) -> None:
        """``p.grad`` from the engine's gradients by name; a parameter that several blocks use (one object under
        each block's name) gets the sum of its uses' gradients (the docs' Methods page)."""
        for name, p in self.named_parameters(remove_duplicate=False):
            g = grads.get(name)
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def _check_step(self, inputs: tuple, y: Tensor, allow_eval: bool) -> None:
        """Refuse, before any work, a step that would fail inside the engine or silently train the wrong thing."""
        if not self.training and not allow_eval:
            raise FwdTransError(
                "the converted model is in eval mode: BatchNorm would normalise with its frozen running statistics "
                "and dropout would be off (convert keeps the original model's mode). Fix: converted.train() before "
                "training, or allow_eval=True to train in eval mode on purpose."
            )
        for j, block in enumerate(self.blocks):
            mixed = next((n for n, m in block.named_modules() if m.training != block.training), None)
            if isinstance(block, ModalBlock) and mixed is not None:
                raise FwdTransError(
                    f"block {j} is in {'train' if block.training else 'eval'} mode but its module '{mixed}' is not: "
                    "the block traces layers whose arguments depend on the mode (F.batch_norm(..., self.training)), "
                    "so it runs one graph per mode, for the whole block. Fix: set the mode on the converted model "
                    "(converted.train() / converted.eval()) or on a whole block."
                )
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if torch.is_autocast_enabled(device.type):
            raise FwdTransError(
                f"the step runs under torch.autocast({device.type!r}, {torch.get_autocast_dtype(device.type)}), "
                "which torch.func.jvp does not support (its tangents keep the parameters' dtype while autocast "
                "lowers the primals', and the op fails), and low precision would blur the directional derivatives "
                "anyway. Fix: call the step outside torch.autocast (autocast the evaluation only)."
            )
        batch = self._check_inputs(inputs, param)
        if not isinstance(y, Tensor) or y.dtype != torch.long or y.dim() != 1 or y.shape[0] != batch:
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise FwdTransError(f"labels must be an int64 vector of length {batch}, got {got}.")
        if batch == 0:
            raise FwdTransError("the batch is empty (0 samples): there is no loss to train on. "
                                "Fix: skip empty batches (e.g. DataLoader(..., drop_last=True)).")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise FwdTransError(
                f"labels must lie in [0, {self.num_classes}) (the model outputs {self.num_classes} classes), "
                f"got values in [{int(y.min())}, {int(y.max())}]. Fix: remap the labels or change the model's output "
                "size."
            )
        if batch == 1:
            norm = next((n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                         and m.training), None)
            if norm is not None:
                raise FwdTransError(
                    f"a batch of 1 sample: BatchNorm '{norm}' (train mode) normalises each batch with its own "
                    "statistics and cannot do so from one sample. Fix: use batches of at least 2 samples (e.g. "
                    "DataLoader(..., drop_last=True) when the last batch would hold 1)."
                )

    def _check_inputs(self, inputs: tuple, param: Tensor | None) -> int:
        """Compare ``inputs`` with the example inputs' per-sample shapes, dtypes and device; return the batch size."""
        param_dtype = param.dtype if param is not None else torch.get_default_dtype()
        expected = {p: None if v is None else (v[0], v[1] or param_dtype) for p, v in self.input_spec.items()}
        got = _named_leaves(inputs, self.input_names)
        if len(inputs) != len(self.input_names) or got.keys() != expected.keys():
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

    def compiled_gradients(self, options: Mapping | None = None) -> Callable:
        """The step's gradient function ``(inputs, y, noise) -> (grads, buffers, metrics)``, the engine's
        ``gradients`` on this model's plan under ``torch.compile(..., fullgraph=True, dynamic=False, **options)``,
        the plan's inductor options (``_engine.inductor_options``) under ``options``'s own; built once per
        ``options`` (torch recompiles it when the method, shapes or dtypes change)."""
        plan = self.plan
        options = dict(options or {})
        if options.get("backend", "inductor") == "inductor":  # the step's inductor options, then the caller's
            mode = options.pop("mode", None)  # torch.compile takes a mode or options, not both: the mode's options
            from torch._inductor import list_mode_options  # (imports the compiler: not before it is needed)

            inductor = {**(list_mode_options(mode) if mode else {}),
                        **_engine.inductor_options(plan), **options.pop("options", {})}
            options.update({"options": inductor} if inductor else {})
        key = repr(sorted(options.items()))  # options may nest dicts: unhashable
        _engine.check_compilable(plan)
        if key not in self._compiled:
            # dynamo keeps one cache (at most torch._dynamo.config.recompile_limit graphs) per code
            # object, and equal code objects share it: give each model's step a code object of its own
            fn = _engine.gradients
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(self):x}")
            own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
            # compile the function itself: torch.compile wraps other callables (a partial) in one shared frame
            self._compiled[key] = torch.compile(own, fullgraph=True, **{"dynamic": False, **options})
        return functools.partial(self._compiled[key], plan)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles compile afresh: a compiled step is bound to it
        return {**super().__getstate__(), "_compiled": {}, "reducers": {}}  # and its process groups

    def train_step(self, optimizer: torch.optim.Optimizer, *, diagnostics: bool = False,
                   compile: bool | Mapping = False, allow_eval: bool = False, process_group: Any = None,
                   distributed: bool | None = None, sync_batchnorm: bool | None = None
                   ) -> Callable[[Inputs, Tensor], dict]:
        """A function ``step(x, y) -> metrics`` that computes the gradients and applies ``optimizer``.

        ``x`` is what [`compute_gradients`][fwdtrans.Converted.compute_gradients] takes: a tensor, a tuple
        of inputs (``step((a, b), y)`` for ``forward(a, b)``) or a dict. ``optimizer`` must hold the
        converted model's parameters (``converted.parameters()``, not the original model's): one that holds
        none of the trained parameters is refused, one that misses some of them (e.g. the heads of a method
        that trains them) gets a ``UserWarning`` naming them. A model in eval mode is refused at each step
        unless ``allow_eval=True``.

        With ``compile=True`` the whole gradient computation (forward sweep, tangent streams,
        projections, pull-backs) is one ``torch.compile(fullgraph=True)`` graph: the first step
        compiles (one to several minutes on a CPU), later steps reuse it. A mapping instead of
        ``True`` is passed on to ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``; any other value is
        refused); a step on a CPU that pushes tangent streams, or whose model has a convolution that oneDNN's
        AVX2 kernels get wrong channels-last, adds inductor's ``layout_optimization=False`` (see the Performance
        page), which the mapping's ``options`` override. Noise guesses
        are drawn before the compiled call, so compiled and eager steps use the same numbers; the
        optimizer step runs eagerly.

        With ``diagnostics=True`` the metrics also hold, per block, ``cosine/block{j}`` (estimate vs
        target gradient), ``norm_ratio/block{j}`` and ``guess_cosine/block{j}`` (the paper's Eq. 6),
        from [`fwdtrans.check`][fwdtrans.check] on the same batch: about five extra steps' work. Off, they cost
        nothing.

        **Data parallel.** When ``torch.distributed`` is initialised (e.g. under ``torchrun``) the step reduces
        over the default group, or ``process_group``, so that N ranks on 1/N of a batch each compute the step of
        the whole batch; ``distributed=False`` turns it off. Building the step broadcasts rank 0's parameters,
        buffers and noise generator to every rank (as DDP does). ``sync_batchnorm=True`` computes BatchNorm's
        batch statistics over the group (default: ``convert``'s ``sync_batchnorm``); otherwise each rank
        normalises its own share, as under DDP. Diagnostics are this rank's. See the docs' "Scaling out" page.

        Examples:
            >>> import torch, fwdtrans
            >>> converted = fwdtrans.convert(fwdtrans.models.resnet18(width=4), torch.randn(2, 3, 32, 32), blocks=2)
            >>> step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05))
            >>> metrics = step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        """
        _check_compile(compile)
        self._check_optimizer(optimizer)
        reduce = _distributed.resolve(self, process_group, distributed, sync_batchnorm, bool(compile))
        if reduce is not None:
            _distributed.broadcast_state(self, reduce.group)
        parallel = {"process_group": process_group, "distributed": distributed, "sync_batchnorm": sync_batchnorm}

        def step(x: Inputs, y: Tensor) -> dict[str, Tensor]:
            extra = check(self, (x, y)).metrics() if diagnostics else {}
            metrics = self.compute_gradients(x, y, compile=compile, allow_eval=allow_eval, **parallel)
            metrics.update({k: torch.tensor(v) for k, v in extra.items()})
            if not torch.isfinite(metrics["loss"]):
                raise FwdTransError(
                    f"the loss is {float(metrics['loss'])}: the step was not applied, the parameters are those "
                    "of the previous step. Fix: lower the learning rate, or check the inputs for NaN/inf."
                )
            optimizer.step()
            return metrics

        return step

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that holds none of the trained parameters; warn when it misses some."""
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise FwdTransError(f"train_step needs a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                                "Fix: converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05)).")
        held = {id(p) for group in groups for p in group["params"]}
        trained = [(n, p) for n, p in self.named_parameters()
                   if p.requires_grad and (n.startswith("blocks.") or self.method.trains_heads)]
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


def _named_leaves(inputs: tuple, names: tuple[str, ...]) -> dict[str, object]:
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


def _check_compile(compile: object) -> None:
    if not isinstance(compile, (bool, Mapping)):
        raise FwdTransError(f"compile={compile!r} is neither a bool nor a mapping of torch.compile options. Fix: "
                            "compile=True, compile=False, or compile={'mode': ...} (torch.compile's keywords).")


def _describe(leaves_by_path: Mapping[str, object]) -> str:
    return ", ".join(f"{path}: {_show(v)}" for path, v in leaves_by_path.items()) or "no inputs"


def convert(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    blocks: int | list[str] = 8,
    heads: HeadSpec = "auto",
    balance: str = "flops",
    method: Method | None = None,
    target: Target | None = None,
    guess: GuessOption | None = None,
    space: SpaceName | None = None,
    granularity: Granularity | None = None,
    tangents: int | None = None,
    aggregation: Aggregation | None = None,
    per_sample: PerSample | None = None,
    engine: Engine | None = None,
    streams: Streams | None = None,
    recompute: bool | None = None,
    multi_tensor: bool = False,
    sync_batchnorm: bool = False,
    seed: int = 0,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict | None = None,
) -> Converted:
    """Cut ``model`` into blocks with auxiliary heads, ready to train with forward gradients.

    The method is either ``method=`` a [`fwdtrans.Method`][fwdtrans.Method] or its fields as keywords
    (``target`` to ``recompute``; a keyword left out, or ``None``, takes the Method's default), not both.
    The docs' Methods page maps each field to the paper and gives its cost.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace and that returns logits ``(N, classes)``,
            with its parameters on a real device (not ``meta``). It is never modified: ``convert`` works
            on a deep copy, in the model's mode (train or eval).
        example_inputs: what ``model`` accepts (batch first): a tensor, a tuple of the positional inputs
            of a model with several (``forward(a, b)``: ``(a, b)``), or a dict (``forward(batch)``). Steps
            must pass inputs of the same structure, per-sample shapes and dtypes; integer inputs (token
            ids) and masks are passed through, only the blocks' outputs carry tangents.
        blocks: a block count of at least 2 (cuts placed where exactly one tensor crosses, balancing
            ``balance``) or a non-empty list of names to cut after (see [`fwdtrans.inspect`][fwdtrans.inspect]).
        heads: ``"auto"`` (paper-style heads within 10% of their block's FLOPs), ``"cnn"``,
            ``"mlp"``, ``"linear"``, a [`fwdtrans.heads`][fwdtrans.heads] spec, an ``nn.Module``, a callable
            ``shape -> nn.Module`` given each cut's per-sample output shape (or ``(shape, num_classes) ->
            nn.Module``: a callable with two required positional parameters gets both), or a dict from cut names (any
            name ``blocks=`` accepts for the cut) to any of these (``"*"`` for the rest). A module is
            deep-copied for each cut: the object passed is never trained or moved. Every head is run once on
            its block's output and must return logits ``(N, classes)``.
        balance: what ``blocks=N`` balances: forward ``"flops"``, ``"params"`` or activation ``"memory"``.
        method: the whole method, instead of the keywords ``target`` to ``recompute``.
        multi_tensor: also cut where several tensors cross (e.g. inside a residual block); each
            crossing tensor gets its own head, guess and tangent (activity space, ``per_sample="by-loss"``,
            per-block or sequential streams; weight space).
        target: the Gradient Target: ``"global"``, ``"local"`` or ``"intermediate"``.
        guess: the Gradient Guess: ``"local"``, ``"ntk"``, ``"fixed-ntk"``, ``"gaussian"``,
            ``"rademacher"``, ``"global"`` (backprop) or a callable ``guess(j, h, y)``.
        space: ``"activity"``, ``"weight"`` or ``"span"``.
        granularity: weight space: one projection per ``"tensor"``, per ``"block"``, ``"joint"``, or per
            ``"sample"`` and tensor (the official code's default weight space).
        tangents: random guesses per block.
        aggregation: how several tangents combine: ``"mean"`` or ``"project"``.
        per_sample: activity space under sample mixing: ``"by-loss"`` or ``"exact"``.
        engine: ``"forward"`` (forward-mode AD) or ``"reference"`` (simulated with backprop).
        streams: how the forward engine schedules tangents: ``"per-block"``, ``"joint"`` or
            ``"sequential"``.
        recompute: recompute each block's forward for its pull-back instead of storing it.
        sync_batchnorm: in data-parallel steps (``torch.distributed``), compute BatchNorm's batch statistics
            over the whole process group (``torch.nn.SyncBatchNorm``'s semantics), for the single-process result;
            by default each rank normalises its own share of the batch, as under DDP. ``train_step`` and
            ``compute_gradients`` can override it. See the docs' "Scaling out" page for the methods it supports.
        seed: seeds the step's random guesses and NTK re-initialisations (the same on every rank).
        leaf_modules: module classes to keep whole when tracing (escape hatch for untraceable code).
        autowrap_functions: free functions to record as single calls when tracing (einops layers
            and functions are handled without this).
        concrete_args: values for forward arguments that steer Python control flow (``torch.fx``).

    Returns:
        A new [`Converted`][fwdtrans.Converted] module.

    Examples:
        >>> import torch, fwdtrans
        >>> model = fwdtrans.models.resnet18(width=8)
        >>> converted = fwdtrans.convert(model, torch.randn(2, 3, 32, 32), blocks=8, heads="linear")
        >>> converted.cut_names
        ('layer1.0', 'layer1.1', 'layer2.0', 'layer2.1', 'layer3.0', 'layer3.1', 'layer4.0')
    """
    method = _method(method, target=target, guess=guess, space=space, granularity=granularity,
                     tangents=tangents, aggregation=aggregation, per_sample=per_sample, engine=engine,
                     streams=streams, recompute=recompute)
    if isinstance(model, nn.Module) and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise FwdTransError(
            f"{type(model).__name__} has parameters on the meta device: shapes without data, nothing to train. "
            "Fix: materialise it first, e.g. model.to_empty(device='cpu'), then initialise or load its weights."
        )
    example_inputs = as_inputs(example_inputs)
    traced = trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                   concrete_args=concrete_args)
    fused_rnn_free(traced.root)  # RNNs on kernels with forward AD (the copy's, never the user's)
    if len(traced.output_shape) != 2:
        raise FwdTransError(
            f"{type(model).__name__} returns shape {traced.output_shape}; fwdtrans needs logits (N, classes). "
            "Fix: wrap the model so that it returns class scores."
        )
    num_classes = traced.output_shape[1]
    cuts = choose_cuts(traced, blocks, balance, multi_tensor)
    if any(len(c.crossing) > 1 for c in cuts):
        method.check_multi_tensor([c.name for c in cuts if len(c.crossing) > 1])
    check_head_keys(heads, cuts)
    modules = split(traced, cuts)
    _refuse_shared_statistics(modules, traced.renamed)
    costs = block_costs(traced, cuts)
    head_modules = [build_cut_head(heads, cut.shapes, num_classes, name=cut.name, aliases=cut.aliases,
                                   block_flops=cost["flops"] // traced.batch)
                    for cut, cost in zip(cuts, costs, strict=False)]  # the last block has no head
    converted = Converted(modules, head_modules, [c.name for c in cuts], method, num_classes, seed,
                          tuple(c.shapes for c in cuts))
    converted.renamed = traced.renamed
    converted.counters = _counters(modules, traced)
    converted.sync_batchnorm = bool(sync_batchnorm)
    converted.original_keys = tuple(model.state_dict())
    used = {converted.original_name(k) for k in converted.state_dict() if k.startswith("blocks.")}
    tensors = model.state_dict(keep_vars=True)
    read = {id(tensors[k]): k for k in used if k in tensors}
    converted.aliases = {k: read[id(t)] for k, t in tensors.items() if k not in used and id(t) in read}
    converted.unused = {k: v.detach().clone() for k, v in model.state_dict().items()
                        if k not in used and k not in converted.aliases}
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        converted.to(device=ref.device, dtype=ref.dtype)
    converted.input_names = tuple(n.target for n in traced.graph.nodes if n.op == "placeholder")[:len(example_inputs)]
    converted.input_spec = {  # per tensor leaf: per-sample shape and dtype (None: the parameters' dtype)
        path: (tuple(v.shape[1:]), None if ref is not None and v.dtype == ref.dtype else v.dtype)
        if isinstance(v, Tensor) else None
        for path, v in _named_leaves(example_inputs, converted.input_names).items()
    }
    with preserved_state(converted):  # the probes leave every buffer as the model had it
        converted.eval()  # run every head once on its block's output
        with torch.no_grad():
            h = example_inputs
            for block, head, name in zip(modules, head_modules, converted.cut_names, strict=False):
                h = (block(*h),)
                check_head(head, h[0], num_classes, name)
        converted.train()  # what the steps run
        converted.cost = of_blocks(method, modules, head_modules, cuts, costs, traced.batch, traced.batch)
        method.warn_if_costly(method.stream_count(len(modules), traced.batch,
                                                  [len(list(m.parameters())) for m in modules],
                                                  [len(c.crossing) for c in cuts]), converted.cost)
        check_recompute(modules, method)
        converted.dropout = random_blocks(modules, example_inputs)
        converted.math_attention = check_forward_ad(modules, example_inputs, method)
    converted.train(model.training)
    return converted


def _counters(blocks: Sequence[nn.Module], traced: Traced) -> tuple[str, ...]:
    """The converted names of ``traced.counters``: each ``num_batches_tracked`` is registered in the first
    block that uses its BatchNorm (whose graph reads its statistics, not the counter itself)."""
    names = []
    for name in traced.counters:
        owner, _, attr = name.rpartition(".")
        j = next((j for j, b in enumerate(blocks) if _has_module(b, owner)), None)
        if j is not None:
            blocks[j].get_submodule(owner).register_buffer(attr, traced.root.get_buffer(name))
            names.append(f"blocks.{j}.{name}")
    return tuple(names)


def _has_module(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _refuse_shared_statistics(blocks: Sequence[nn.Module], renamed: dict[str, str]) -> None:
    """Refuse running statistics (a BatchNorm's, called as a module or traced through) that several blocks
    update: each block updates them from a copy of its own, so one update would be lost (parameters used in
    several blocks are fine: their gradients add up)."""
    users: dict[int, tuple[str, str, list[int]]] = {}
    for j, block in enumerate(blocks):
        for name, m in block.named_modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                users.setdefault(id(m), (name, type(m).__name__, []))[2].append(j)
        for name, b in block.named_buffers():
            owner, _, attr = name.rpartition(".")
            if attr in ("running_mean", "running_var") and not isinstance(block.get_submodule(owner),
                                                                           nn.modules.batchnorm._NormBase):
                users.setdefault(id(b), (owner, "BatchNorm traced through", []))[2].append(j)
    for name, kind, js in users.values():
        if len(js) > 1:
            raise FwdTransError(
                f"module '{original_target(name, renamed)}' ({kind}) runs in blocks "
                f"{', '.join(map(str, js))}: each block would update its running statistics from a copy of its own "
                "and one update would be lost. Fix: cut so that all its uses fall in one block (blocks=[names] "
                "with no cut between its first use and its last; see fwdtrans.inspect), or give each use its own "
                "module."
            )


def _method(method: Method | None, **options: Any) -> Method:
    """``method=``, or a Method from the keywords given (those not ``None``); refuse both at once."""
    given = {k: v for k, v in options.items() if v is not None}
    if method is None:
        return Method(**given)
    if not isinstance(method, Method):
        raise FwdTransError(f"method={method!r} is not a fwdtrans.Method. Fix: method=fwdtrans.Method(...), or pass "
                            "its fields as keywords.")
    if given:
        first = next(iter(given))
        raise FwdTransError(f"convert got method= and the method keyword(s) {', '.join(given)}: give the method "
                            f"one way. Fix: set them in the Method (dataclasses.replace(method, {first}=...)), or "
                            "drop method= and pass every field as a keyword.")
    return method
