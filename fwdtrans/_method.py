"""Which gradient each block receives: a Gradient Target, a Gradient Guess and a space.

The options and their names follow the paper (Fournier et al., 2023, section 3); the docs'
"Concepts" page gives the formulas. Validation happens here, at ``convert`` time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._errors import FwdTransError

__all__ = ["Method"]

TARGETS = ("global", "local")
GUESSES = ("global", "local")
SPACES = ("activity",)
PER_SAMPLE = ("by-loss", "exact")


@dataclass(frozen=True)
class Method:
    """A Gradient Target x Gradient Guess x space choice.

    Attributes:
        target: the gradient each block should follow: ``"global"`` (end-to-end loss) or
            ``"local"`` (the block's own head loss).
        guess: the direction it is projected on: ``"local"`` (gradient of the block's head loss,
            normalised per sample) or ``"global"`` (the exact gradient).
        space: where the projection happens: ``"activity"`` (per sample, on the block output).
        per_sample: how a sample's directional derivative is formed when something downstream
            mixes samples (BatchNorm in train mode): ``"by-loss"`` (one tangent stream per block;
            sample n gets the derivative of its own loss term) or ``"exact"`` (one stream per
            sample, the paper's estimator; slow). Both agree when nothing mixes samples.

    When the guess equals the target, the projection is the identity and the block gets the
    target gradient itself: ``global``/``global`` is backprop, ``local``/``local`` is greedy local
    learning.

    Example:
        >>> Method(target="global", guess="local").kind
        'projected'
    """

    target: str = "global"
    guess: str = "local"
    space: str = "activity"
    per_sample: str = "by-loss"

    def __post_init__(self) -> None:
        for field, allowed in (("target", TARGETS), ("guess", GUESSES), ("space", SPACES),
                               ("per_sample", PER_SAMPLE)):
            value = getattr(self, field)
            if value not in allowed:
                raise FwdTransError(f"{field}={value!r} is not supported. Fix: use one of {', '.join(allowed)}.")
        if self.kind == "projected" and (self.target, self.guess) != ("global", "local"):
            raise FwdTransError(
                f"target={self.target!r} with guess={self.guess!r} is not available. "
                "Fix: use target='global' with guess='local' or 'global', or target='local' with guess='local'."
            )

    @property
    def kind(self) -> str:
        """``"backprop"``, ``"local"`` (greedy local learning) or ``"projected"`` (forward gradient)."""
        if self.guess == self.target:
            return "backprop" if self.target == "global" else "local"
        return "projected"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)
