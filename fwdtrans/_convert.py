"""``convert``: turn any traceable model into a chain of blocks with auxiliary heads (the top of the library:
trace -> cuts -> heads -> blocks -> the method's checks and probes -> a :class:`~fwdtrans.Converted`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._blocks import as_inputs
from ._converted import Converted
from ._cost import of_blocks
from ._cuts import block_costs, choose_cuts, split
from ._errors import FwdTransError
from ._method import Aggregation, Engine, Granularity, GuessOption, Method, PerSample, SpaceName, Streams, Target
from ._step import Inputs, named_leaves
from ._support import check_forward_ad, check_recompute, fused_rnn_free, random_blocks
from ._trace import Traced, original_target, preserved_state, trace
from .heads import HeadSpec, build_cut_head, check_head, check_head_keys

__all__ = ["convert"]


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
        for path, v in named_leaves(example_inputs, converted.input_names).items()
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
