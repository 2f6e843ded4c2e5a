"""The vocabulary: which gradient each block receives (a Gradient Target, a Gradient Guess and a space),
the facts of each space that hold before any engine runs it, and a step's predicted :class:`Cost`.

The options follow the paper (Fournier et al., 2023, section 3) and map one to one onto the
official code's flags; the docs' "Methods" page has the table. Everything is validated here, at
``convert`` time, so a bad combination fails before any training. This module imports nothing else of
fwdtrans but its errors: every layer above reads it (docs' Architecture page).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

from torch import Tensor

from ._errors import FwdTransError

__all__ = ["BACKPROP", "Cost", "Method", "on_reference"]

# The options, one Literal each: the fields' types, their validation and the CLI's choices come from these.
Target = Literal["global", "local", "intermediate"]
GuessName = Literal["local", "ntk", "fixed-ntk", "gaussian", "rademacher", "global"]
GuessOption = GuessName | Callable[[int, Tensor, Tensor], Tensor]  # a name, or guess(j, h, y) -> direction like h
SpaceName = Literal["activity", "weight", "span"]
Granularity = Literal["tensor", "block", "joint", "sample"]
PerSample = Literal["by-loss", "exact"]
Aggregation = Literal["mean", "project"]
Engine = Literal["forward", "reference"]
Streams = Literal["per-block", "joint", "sequential"]
Kind = Literal["backprop", "local", "projected"]

TARGETS: tuple[str, ...] = get_args(Target)
GUESSES: tuple[str, ...] = get_args(GuessName)
SPACES: tuple[str, ...] = get_args(SpaceName)
GRANULARITY: tuple[str, ...] = get_args(Granularity)
PER_SAMPLE: tuple[str, ...] = get_args(PerSample)
AGGREGATION: tuple[str, ...] = get_args(Aggregation)
ENGINES: tuple[str, ...] = get_args(Engine)
STREAMS: tuple[str, ...] = get_args(Streams)
NOISE = ("gaussian", "rademacher")
HEAD_GUESSES = ("local", "ntk", "fixed-ntk")
MANY_STREAMS = 64  # convert() warns above this many tangent streams per step
BACKPROP = 3.0  # one forward and its backward (input and weight gradients), in forward passes
# how many blocks past its own a block's target is read: 0 (local), 1 (intermediate), the logits (global)
REACH = {"local": 0, "intermediate": 1, "global": math.inf}
CHEAPER = "granularity='block' or 'joint', fewer tangents, or per_sample='by-loss'"  # the cost warning's advice


@dataclass(frozen=True)
class Cost:
    """One step's predicted cost, in forward passes of the blocks (``F``).

    Attributes:
        streams: tangent streams the forward engine propagates per step (``Method.stream_count``).
        forward: the forward engine's step, in ``F``.
        reference: the reference engine's step (the same estimates by pull-backs), in ``F``.
        backprop: a backprop step, ``3F``.
        tangent_bytes: the forward engine's largest bundle of open tangents (bytes at the step's batch,
            float32); the ``vmap(jvp)`` temporaries of a block come on top, a few times this.

    Examples:
        >>> import torch, fwdtrans
        >>> model = fwdtrans.models.resnet18(width=4)
        >>> method = fwdtrans.Method(space="weight", granularity="tensor")
        >>> cost = fwdtrans.inspect(model, torch.randn(2, 3, 32, 32), blocks=model.paper_cuts(), heads="linear",
        ...                         method=method, batch=64).cost
        >>> cost.streams, cost.cheaper, cost.backprop
        (54, 'reference', 3.0)
    """

    streams: int
    forward: float
    reference: float
    backprop: float = BACKPROP
    tangent_bytes: int = 0

    @property
    def cheaper(self) -> str:
        """The engine with the lower predicted cost (``"forward"`` on a tie)."""
        return "reference" if self.reference < self.forward else "forward"

    def ratio(self, engine: str) -> float:
        """The predicted step time of ``engine`` over backprop's."""
        return (self.forward if engine == "forward" else self.reference) / self.backprop

    def __str__(self) -> str:
        return (f"{self.streams} tangent streams; predicted cost (forward passes F, backprop {self.backprop:.1f}F): "
                f"forward engine {self.forward:.1f}F ({self.ratio('forward'):.2f}x backprop), reference engine "
                f"{self.reference:.1f}F ({self.ratio('reference'):.2f}x backprop)")


@dataclass(frozen=True)
class Method:
    """A Gradient Target x Gradient Guess x space choice, and how it is computed.

    Attributes:
        target: the gradient a block should follow: ``"global"`` (end-to-end loss), ``"local"``
            (its own head's loss) or ``"intermediate"`` (the next block's head loss; paper Table 5).
        guess: the direction it is projected on: ``"local"`` (gradient of the block's head loss,
            normalised), ``"ntk"`` (the same with a head re-initialised at every step, never
            trained), ``"fixed-ntk"`` (a random head kept fixed), ``"gaussian"`` / ``"rademacher"``
            noise (not normalised), ``"global"`` (the exact gradient: backprop), or a callable
            ``guess(j, h, y) -> Tensor`` returning an activity-space direction shaped like ``h``.
        space: ``"activity"`` (per-sample projection of the block-output gradient, then a
            block-local pull-back; Eq. 5), ``"weight"`` (projection of the parameter gradient; Eq. 4)
            or ``"span"`` (each sample's target projected on the span of the batch's guesses;
            Table 6).
        granularity: weight space only: one projection per parameter ``"tensor"`` (the paper's
            appendix A.3), per ``"block"``, one ``"joint"`` scalar for all blocks (LocalFG), or one per
            ``"sample"`` and parameter tensor, summed over the batch (the official code's default
            ``--space weight``; best with ``engine="reference"``).
        tangents: guesses per block (``k``); noise guesses only.
        aggregation: how ``k`` projections combine: ``"mean"`` of the ``k`` estimates or the
            orthogonal ``"project"``-ion onto their span.
        per_sample: activity space, when something downstream mixes samples (BatchNorm in train
            mode): ``"by-loss"`` (sample n gets the derivative of its own loss term; one stream per
            guess) or ``"exact"`` (the paper's estimator; one stream per sample). Equal otherwise.
        engine: ``"forward"`` (forward-mode AD) or ``"reference"`` (the same estimator simulated
            with backprop, as the paper's code does).
        streams: how the forward engine carries tangents: ``"per-block"`` (one stream per guess,
            all pushed together in one sweep; the paper's estimator), ``"joint"`` (one stream for
            all blocks: every block's projection uses the single directional derivative
            ``sum_j <dL/dh_j, u_j>``, as LocalFG; ~1 forward of tangent work; global target), or
            ``"sequential"`` (per-block streams pushed one at a time after the forward: low memory,
            slower). Weight space with ``granularity="joint"`` always uses one joint stream.
        recompute: activity space, forward engine: keep only each block's input during the sweep
            and recompute the block's forward for its pull-back (less memory, one more forward).

    Examples:
        >>> Method(target="global", guess="local", space="weight", granularity="block").kind
        'projected'
    """

    target: Target = "global"
    guess: GuessOption = "local"
    space: SpaceName = "activity"
    granularity: Granularity = "tensor"
    tangents: int = 1
    aggregation: Aggregation = "mean"
    per_sample: PerSample = "by-loss"
    engine: Engine = "forward"
    streams: Streams = "per-block"
    recompute: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("target", TARGETS), ("space", SPACES), ("granularity", GRANULARITY),
                              ("aggregation", AGGREGATION), ("per_sample", PER_SAMPLE), ("engine", ENGINES),
                              ("streams", STREAMS)):
            value = getattr(self, name)
            if value not in allowed:
                raise FwdTransError(f"{name}={value!r} is not an option. Fix: use one of {', '.join(allowed)}.")
        if not callable(self.guess) and self.guess not in GUESSES:
            raise FwdTransError(f"guess={self.guess!r} is not an option. Fix: use one of {', '.join(GUESSES)} "
                                "or a callable guess(j, h, y).")
        if not isinstance(self.tangents, int) or self.tangents < 1:
            raise FwdTransError(f"tangents={self.tangents!r}: use a positive integer.")
        problems = []
        if self.guess == "global" and self.target != "global":
            problems.append("guess='global' is the exact gradient of the global loss: use it with target='global' "
                            "(backprop)")
        if self.tangents > 1 and self.guess not in NOISE:
            problems.append(f"tangents={self.tangents} needs a random guess ('gaussian' or 'rademacher'): "
                            f"guess={self._guess_name!r} gives one direction per block")
        if self.space == "span" and self.guess not in HEAD_GUESSES:
            problems.append("space='span' projects on the span of the batch's head guesses: use guess='local', "
                            "'ntk' or 'fixed-ntk'")
        if self.space == "weight" and callable(self.guess):
            problems.append("a callable guess gives activity-space directions: use space='activity'")
        if self.granularity != "tensor" and self.space != "weight":
            problems.append(f"granularity={self.granularity!r} applies to space='weight'")
        if self.per_sample == "exact" and self.space != "activity":
            problems.append("per_sample='exact' applies to space='activity'")
        if self.aggregation == "project" and self.guess not in NOISE:
            problems.append(f"aggregation='project' combines several random guesses: guess={self._guess_name!r} "
                            "gives one direction per block; use aggregation='mean'")
        elif self.aggregation == "project" and (self.tangents > 1 and self.joint
                                                or self.space == "weight" and self.granularity == "joint"):
            problems.append("aggregation='project' needs one projection unit per block or tensor: use "
                            "aggregation='mean' with a joint unit")
        if self.recompute and (self.kind != "projected" or self.space == "weight" or self.engine != "forward"):
            problems.append("recompute=True re-runs a block's forward for its activity-space pull-back: it applies "
                            "to forward gradients with space='activity' or 'span' and engine='forward'")
        ignored = [f"{name}={getattr(self, name)!r}" for name, default in (("per_sample", "by-loss"),
                   ("engine", "forward"), ("streams", "per-block")) if getattr(self, name) != default]
        if self.kind != "projected" and ignored:
            what = "guess='global' (backprop)" if self.kind == "backprop" else "target='local', guess='local' (local " \
                "learning)"
            problems.append(f"{what} projects nothing: {', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} "
                            "to forward gradients; leave " + ("it" if len(ignored) == 1 else "them") + " out")
        if self.kind == "projected" and self.streams == "sequential" and (self.engine != "forward"
                                                                           or self.target == "local"):
            problems.append("streams='sequential' schedules the forward engine's streams through the blocks after "
                            "their own: it applies to engine='forward' with target='global' or 'intermediate'")
        if self.streams == "joint":
            if self.target != "global":
                problems.append("streams='joint' sums every block's directional derivative at the logits: it needs "
                                "target='global'")
            if (self.space == "span" or self.per_sample == "exact"
                    or (self.space == "weight" and self.granularity != "joint")):
                problems.append("streams='joint' applies to space='activity' (per_sample='by-loss') or to "
                                "space='weight' with granularity='joint'")
        if self.per_sample_weight:
            if self.streams == "sequential":
                problems.append("granularity='sample' pushes every block's streams on their own after the sweep "
                                "already: use streams='per-block'")
            if self.tangents > 1 and self.guess in NOISE:
                problems.append(f"tangents={self.tangents}: granularity='sample' draws one direction per sample and "
                                "parameter tensor; use tangents=1")
            if self.aggregation == "project" and self.guess in NOISE:
                problems.append("aggregation='project': granularity='sample' projects each sample's share on its one "
                                "direction; use aggregation='mean'")
        if problems:
            raise FwdTransError(f"invalid method {self.describe()}: " + "; ".join(problems) + ".")

    @property
    def _guess_name(self) -> str:
        return getattr(self.guess, "__name__", "callable") if callable(self.guess) else self.guess

    @property
    def kind(self) -> Kind:
        """``"backprop"``, ``"local"`` (greedy local learning) or ``"projected"`` (forward gradient).

        A guess equal to its target makes the projection the identity: ``global``/``global`` is
        backprop and ``local``/``local`` (in any space) is greedy local learning.
        """
        if self.guess == "global":
            return "backprop"
        if self.target == "local" and self.guess == "local":
            return "local"
        return "projected"

    @property
    def joint(self) -> bool:
        """One directional derivative shared by all blocks (``streams="joint"`` or a joint weight unit)."""
        return self.streams == "joint" or (self.space == "weight" and self.granularity == "joint")

    @property
    def per_sample_weight(self) -> bool:
        """The per-sample weight space (``granularity="sample"``), with sweeps of its own."""
        return self.space == "weight" and self.granularity == "sample"

    @property
    def pushes_tangents(self) -> bool:
        """The step carries tangent streams by forward-mode AD (the forward engine's projected sweeps)."""
        return self.kind == "projected" and self.engine == "forward"

    @property
    def param_tangents(self) -> bool:
        """The forward engine pushes parameter directions through a block (weight space), running it again."""
        return self.space == "weight"

    @property
    def reads_per_sample(self) -> bool:
        """The streams' values are read per output sample (activity space by loss, span), else summed."""
        return self.space == "span" or (self.space == "activity" and self.per_sample != "exact")

    @property
    def multi_tensor(self) -> bool:
        """The space gives each tensor crossing a multi-tensor cut a guess of its own."""
        return self.space == "weight" or (self.space == "activity" and self.per_sample != "exact")

    def target_end(self, j: int, last: int) -> int:
        """The block at whose output block ``j``'s target is read (``last``: the logits)."""
        return int(min(j + REACH[self.target], last))

    def crossing(self, j: int, last: int, trained: bool) -> tuple[bool, bool]:
        """What the forward engine pushes through block ``j`` (``trained``: it has trained parameters):
        (a tangent at its input, parameter tangents)."""
        if self.kind != "projected" or self.engine != "forward":
            return False, False
        return j > 0 and REACH[self.target] > 0, self.param_tangents and j < last and trained

    def streams_at(self, batch: int, tensors: int, crossing: int) -> int:
        """Streams opened at one block with ``tensors`` trained parameter tensors and ``crossing`` tensors at
        its cut."""
        k = self.tangents
        if self.space == "span":
            return batch
        if self.space == "activity":
            return k * (batch if self.per_sample == "exact" else crossing)
        if self.per_sample_weight:
            return batch * tensors
        return k * (tensors if self.granularity == "tensor" else 1)

    @property
    def trains_heads(self) -> bool:
        """Heads learn from their own loss when their loss is a guess or a target."""
        if self.guess in ("ntk", "fixed-ntk"):
            return False
        return self.kind == "local" or self.guess == "local" or self.target in ("local", "intermediate")

    def describe(self) -> str:
        parts = [f"target={self.target}", f"guess={self._guess_name}", f"space={self.space}"]
        if self.space == "weight":
            parts.append(f"granularity={self.granularity}")
        if self.tangents > 1:
            parts += [f"tangents={self.tangents}", f"aggregation={self.aggregation}"]
        if self.per_sample != "by-loss":
            parts.append(f"per_sample={self.per_sample}")
        if self.streams != "per-block":
            parts.append(f"streams={self.streams}")
        if self.engine != "forward":
            parts.append(f"engine={self.engine}")
        if self.recompute:
            parts.append("recompute=True")
        return "(" + ", ".join(parts) + ")"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["guess"] = self._guess_name
        return d

    def stream_count(self, blocks: int, batch: int, tensors_per_block: list[int],
                     crossing: list[int] | None = None) -> int:
        """Tangent streams one forward step propagates (0 for backprop and local learning);
        ``crossing``: tensors crossing each cut (1 each by default)."""
        if self.kind != "projected" or self.target == "local" or self.engine == "reference":
            return 0
        if self.joint and self.target == "global":
            return self.tangents
        crossing = crossing or [1] * blocks
        return sum(self.streams_at(batch, tensors_per_block[j], crossing[j]) for j in range(blocks - 1))

    def check_multi_tensor(self, cuts: list[str]) -> None:
        """Refuse the options that cannot give each tensor crossing ``cuts`` its own guess."""
        if self.kind == "projected" and (not self.multi_tensor or self.streams == "joint"):
            raise FwdTransError(
                f"{self.describe()} cannot give each tensor crossing {', '.join(cuts)} its own guess and tangent: "
                "multi-tensor cuts support space='activity' (per_sample='by-loss', streams='per-block' or "
                "'sequential') and space='weight'. Fix: change the method, or cut where one tensor crosses "
                "(multi_tensor=False).")

    def warn_if_costly(self, streams: int, cost: Cost | None = None) -> None:
        """Warn when the step propagates more than ``MANY_STREAMS`` streams; with the step's predicted
        ``cost``, name the cheaper engine."""
        if streams > MANY_STREAMS:
            advice = ("engine='reference' (the same estimates from two pull-backs per block)"
                      if self.per_sample_weight else CHEAPER)
            predicted = ""
            if cost is not None:
                predicted = (f"; predicted step: {cost.forward:.1f} forward passes with engine='forward', "
                             f"{cost.reference:.1f} with engine='reference', backprop {cost.backprop:.0f}")
                if cost.cheaper == "reference" and "engine='reference'" not in advice:
                    advice = f"engine='reference' (the same estimates, cheaper here), {advice}"
            warnings.warn(
                f"{self.describe()} propagates {streams} tangent streams per step (each costs about one block "
                f"forward per block it crosses{predicted}). Consider {advice}.", stacklevel=3)


def on_reference(method: Method) -> Method:
    """``method`` on the reference engine (the same estimates), without the forward engine's own options
    (``streams="sequential"``, ``recompute``); a method that projects nothing is returned as is."""
    if method.kind != "projected":
        return method
    streams = "per-block" if method.streams == "sequential" else method.streams
    return replace(method, engine="reference", streams=streams, recompute=False)
