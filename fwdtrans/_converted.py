"""``Converted``: a model cut into blocks with auxiliary heads, as ``convert`` returns it; a thin facade over
the step (``_step``), its names and checkpoints, and its data-parallel and compiled variants."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _distributed, _engine, _step
from ._blocks import as_inputs
from ._check import check
from ._engine import Plan
from ._errors import FwdTransError
from ._method import Cost, Method
from ._step import Inputs
from ._trace import original_target

__all__ = ["Converted"]


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
        _step.count_batches(self)
        return h

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
        _step.check_compile(compile)
        inputs = as_inputs(x)
        _step.check_step(self, inputs, y, allow_eval)
        reduce = _distributed.resolve(self, process_group, distributed, sync_batchnorm, bool(compile))
        return self._gradients(inputs, y, compile=compile, reduce=reduce)

    def _gradients(self, x: Inputs, y: Tensor, *, record: dict | None = None,
                   compile: bool | Mapping = False, reduce: _distributed.Reducer | None = None) -> dict[str, Tensor]:
        """The step without the checks: writes ``p.grad`` (old gradients cleared) and the buffers (unless the
        loss is not finite); returns detached metrics. ``record`` receives the engine's per-block internals;
        ``reduce``: a data-parallel step's reductions (``_distributed``). Every step (either engine's, ``check``'s)
        runs on the attention kernel ``convert`` chose."""
        return _step.run(self, x, y, record=record, compile=compile, reduce=reduce)

    def compiled_gradients(self, options: Mapping | None = None) -> Callable:
        """The step's gradient function ``(inputs, y, noise) -> (grads, buffers, metrics)``, the engine's
        ``gradients`` on this model's plan under ``torch.compile(..., fullgraph=True, dynamic=False, **options)``,
        the plan's inductor options (``_engine.inductor_options``) under ``options``'s own; built once per
        ``options`` (torch recompiles it when the method, shapes or dtypes change)."""
        return _step.compiled_step(self, options)

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
        _step.check_compile(compile)
        _step.check_optimizer(self, optimizer)
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
