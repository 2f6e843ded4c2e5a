"""``convert``: turn any traceable model into a chain of blocks with auxiliary heads."""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from . import _engine
from ._check import check
from ._cuts import block_costs, choose_cuts, split
from ._errors import FwdTransError
from ._method import Method
from ._support import attention_context, check_forward_ad, check_recompute
from ._trace import trace
from .heads import HeadSpec, build_cut_head

__all__ = ["Converted", "convert"]


class Converted(nn.Module):
    """A model cut into blocks, each but the last with an auxiliary head.

    ``converted(x)`` computes what the original ``model(x)`` computed. Parameters live in
    ``blocks.{j}.<original name>`` and ``heads.{j}.*``; [`original_name`][fwdtrans.Converted.original_name] and
    [`original_state_dict`][fwdtrans.Converted.original_state_dict] map them back to the original model's names.

    Examples:
        >>> import torch, fwdtrans
        >>> model = fwdtrans.models.resnet18(width=8)
        >>> converted = fwdtrans.convert(model, (torch.randn(2, 3, 32, 32),), blocks=4, heads="linear")
        >>> step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05))
        >>> metrics = step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> sorted(metrics)[:2]
        ['accuracy', 'loss']
    """

    def __init__(self, blocks: list[nn.Module], heads: list[nn.Module], cut_names: list[str],
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
        self.math_attention = False  # set by convert when the flash attention kernel lacks forward AD
        self.crossing_shapes = tuple(crossing_shapes)  # per cut: per-sample shapes of the tensors crossing it
        self._compiled: dict[tuple, Callable] = {}

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        """Per cut: the per-sample sizes of the tensors crossing it (packed in that order)."""
        return tuple(tuple(math.prod(t) for t in shapes) for shapes in self.crossing_shapes)

    @property
    def cut_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per cut: the per-sample shape of the block output (one tensor, or ``(D,)`` when packed)."""
        return tuple(shapes[0] if len(shapes) == 1 else (sum(sizes),)
                     for shapes, sizes in zip(self.crossing_shapes, self.segments))

    def _apply(self, fn, recurse=True):  # keep the generator on the parameters' device
        result = super()._apply(fn, recurse)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        if self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return result

    def forward(self, *inputs: Tensor) -> Tensor:
        h = self.blocks[0](*inputs)
        for block in self.blocks[1:]:
            h = block(h)
        return h

    def original_name(self, name: str) -> str:
        """``'blocks.1.layer1.0.conv1.weight'`` -> ``'layer1.0.conv1.weight'``; head names are kept."""
        parts = name.split(".", 2)
        return parts[2] if parts[0] == "blocks" else name

    def original_state_dict(self) -> dict[str, Tensor]:
        """The model's state under the original model's names (heads left out), loadable by the
        original model. Entries the traced graph never reads are carried along unchanged."""
        own = {self.original_name(k): v for k, v in self.state_dict().items() if k.startswith("blocks.")}
        return {k: own.get(k, self.unused.get(k)) for k in self.original_keys}

    def load_original_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a checkpoint of the original model into the blocks."""
        own = {self.original_name(k): k for k in self.state_dict() if k.startswith("blocks.")}
        missing = sorted(set(self.original_keys) - set(state))
        unexpected = sorted(set(state) - set(self.original_keys))
        if missing or unexpected:
            raise FwdTransError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                                "Fix: load a checkpoint of the model that was converted.")
        self.load_state_dict({own[k]: v for k, v in state.items() if k in own}, strict=False)
        self.unused = {k: v.detach().clone() for k, v in state.items() if k not in own}

    def compute_gradients(self, x: Tensor, y: Tensor, *, compile: bool | Mapping = False) -> dict[str, Tensor]:
        """Write the method's gradient into ``p.grad`` of every trained parameter; return metrics.

        Metrics are detached 0-d tensors: ``loss`` (global loss), ``accuracy``, and
        ``loss/head{j}`` for the heads that were run. ``compile=True``: see
        [`train_step`][fwdtrans.Converted.train_step].
        """
        if y.dtype != torch.long or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise FwdTransError(f"labels must be an int64 vector of length {x.shape[0]}, got {y.dtype} {tuple(y.shape)}.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise FwdTransError(
                f"labels must lie in [0, {self.num_classes}) (the model outputs {self.num_classes} classes), "
                f"got values in [{int(y.min())}, {int(y.max())}]. Fix: remap the labels or change the model's output size."
            )
        with attention_context(self.math_attention):
            return _engine.compute_gradients(self, x, y, compile=compile)

    def compiled_gradients(self, options: Mapping | None = None) -> Callable:
        """The step's gradient function, ``torch.compile(..., fullgraph=True, dynamic=False, **options)``;
        built once per ``options`` (torch recompiles it when the method, shapes or dtypes change)."""
        key = tuple(sorted((options or {}).items()))
        if key not in self._compiled:
            # dynamo keeps one cache (at most torch._dynamo.config.recompile_limit graphs) per code
            # object, and equal code objects share it: give each model's step a code object of its own
            fn = _engine.gradients
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(self):x}")
            own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
            # compile the function itself: torch.compile wraps other callables (a partial) in one shared frame
            self._compiled[key] = torch.compile(own, fullgraph=True, **{"dynamic": False, **dict(key)})
        return functools.partial(self._compiled[key], self)

    def __getstate__(self):  # copies and pickles compile afresh: a compiled step is bound to this model
        return {**super().__getstate__(), "_compiled": {}}

    def train_step(self, optimizer: torch.optim.Optimizer, *, diagnostics: bool = False,
                   compile: bool | Mapping = False) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
        """A function ``step(x, y) -> metrics`` that computes the gradients and applies ``optimizer``.

        With ``compile=True`` the whole gradient computation (forward sweep, tangent streams,
        projections, pull-backs) is one ``torch.compile(fullgraph=True)`` graph: the first step
        compiles (one to several minutes on a CPU), later steps reuse it. A mapping instead of
        ``True`` is passed on to ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``). Noise guesses
        are drawn before the compiled call, so compiled and eager steps use the same numbers; the
        optimizer step runs eagerly.

        With ``diagnostics=True`` the metrics also hold, per block, ``cosine/block{j}`` (estimate vs
        target gradient), ``norm_ratio/block{j}`` and ``guess_cosine/block{j}`` (the paper's Eq. 6),
        from [`fwdtrans.check`][fwdtrans.check] on the same batch: about three extra steps' work. Off, they cost
        nothing.
        """

        def step(x: Tensor, y: Tensor) -> dict[str, Tensor]:
            extra = check(self, (x, y)).metrics() if diagnostics else {}
            metrics = self.compute_gradients(x, y, compile=compile)
            metrics.update({k: torch.tensor(v) for k, v in extra.items()})
            if not torch.isfinite(metrics["loss"]):
                raise FwdTransError(
                    f"the loss is {float(metrics['loss'])}: the step was not applied, the parameters are those "
                    "of the previous step. Fix: lower the learning rate, or check the inputs for NaN/inf."
                )
            optimizer.step()
            return metrics

        return step


def convert(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...] | Tensor,
    *,
    blocks: int | list[str] = 8,
    heads: HeadSpec = "auto",
    balance: str = "flops",
    target: str = "global",
    guess: str | Callable = "local",
    space: str = "activity",
    granularity: str = "tensor",
    tangents: int = 1,
    aggregation: str = "mean",
    per_sample: str = "by-loss",
    engine: str = "forward",
    streams: str = "per-block",
    recompute: bool = False,
    multi_tensor: bool = False,
    seed: int = 0,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict | None = None,
) -> Converted:
    """Cut ``model`` into blocks with auxiliary heads, ready to train with forward gradients.

    ``target`` to ``streams`` are the fields of [`fwdtrans.Method`][fwdtrans.Method]; the docs'
    Methods page maps each to the paper and gives its cost.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace and that returns logits ``(N, classes)``.
            It is never modified: ``convert`` works on a deep copy.
        example_inputs: a tensor or tuple of tensors that ``model`` accepts (batch first).
        blocks: a block count (cuts placed where exactly one tensor crosses, balancing ``balance``)
            or a list of names to cut after (see [`fwdtrans.inspect`][fwdtrans.inspect]).
        heads: ``"auto"`` (paper-style heads within 10% of their block's FLOPs), ``"cnn"``,
            ``"mlp"``, ``"linear"``, a [`fwdtrans.heads`][fwdtrans.heads] spec, a callable ``shape -> nn.Module``
            given each cut's per-sample output shape, or a dict from cut names to any of these
            (``"*"`` for the rest).
        balance: what ``blocks=N`` balances: forward ``"flops"``, ``"params"`` or activation ``"memory"``.
        multi_tensor: also cut where several tensors cross (e.g. inside a residual block); each
            crossing tensor gets its own head, guess and tangent (activity space, ``per_sample="by-loss"``,
            per-block or sequential streams; weight space).
        target: the Gradient Target: ``"global"``, ``"local"`` or ``"intermediate"``.
        guess: the Gradient Guess: ``"local"``, ``"ntk"``, ``"fixed-ntk"``, ``"gaussian"``,
            ``"rademacher"``, ``"global"`` (backprop) or a callable ``guess(j, h, y)``.
        space: ``"activity"``, ``"weight"`` or ``"span"``.
        granularity: weight space: one projection per ``"tensor"``, per ``"block"`` or ``"joint"``.
        tangents: random guesses per block.
        aggregation: how several tangents combine: ``"mean"`` or ``"project"``.
        per_sample: activity space under sample mixing: ``"by-loss"`` or ``"exact"``.
        engine: ``"forward"`` (forward-mode AD) or ``"reference"`` (simulated with backprop).
        streams: how the forward engine schedules tangents: ``"per-block"``, ``"joint"`` or
            ``"sequential"``.
        recompute: recompute each block's forward for its pull-back instead of storing it.
        seed: seeds the step's random guesses and NTK re-initialisations.
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
    method = Method(target, guess, space, granularity, tangents, aggregation, per_sample, engine, streams, recompute)
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    traced = trace(model, tuple(example_inputs), leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                   concrete_args=concrete_args)
    if len(traced.output_shape) != 2:
        raise FwdTransError(
            f"{type(model).__name__} returns shape {traced.output_shape}; fwdtrans needs logits (N, classes). "
            "Fix: wrap the model so that it returns class scores."
        )
    num_classes = traced.output_shape[1]
    cuts = choose_cuts(traced, blocks, balance, multi_tensor)
    if any(len(c.crossing) > 1 for c in cuts):
        method.check_multi_tensor([c.name for c in cuts if len(c.crossing) > 1])
    modules = split(traced, cuts)
    batch = example_inputs[0].shape[0]
    costs = block_costs(traced, cuts)
    head_modules = [build_cut_head(heads, cut.shapes, num_classes, name=cut.name, block_flops=cost["flops"] // batch)
                    for cut, cost in zip(cuts, costs)]
    converted = Converted(modules, head_modules, [c.name for c in cuts], method, num_classes, seed,
                          tuple(c.shapes for c in cuts))
    converted.original_keys = tuple(model.state_dict())
    used = {converted.original_name(k) for k in converted.state_dict() if k.startswith("blocks.")}
    converted.unused = {k: v.detach().clone() for k, v in traced.root.state_dict().items() if k not in used}
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        converted.to(device=ref.device, dtype=ref.dtype)
    converted.train(model.training)
    method.warn_if_costly(method.stream_count(len(modules), batch, [len(list(m.parameters())) for m in modules],
                                         [len(c.crossing) for c in cuts]))
    check_recompute(modules, method)
    converted.math_attention = check_forward_ad(modules, tuple(example_inputs), method)
    return converted
