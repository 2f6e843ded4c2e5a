"""Learning-rate schedules, as a function of the global step.

``step`` is the paper's (and the official code's ``StepLR``): the rate is multiplied by ``gamma``
every ``step_size`` epochs. ``cosine`` anneals to zero over the run, step by step. ``constant``
keeps the initial rate. A pure function of the step needs no state of its own: a resumed run
recomputes the rate from the step it resumes at.
"""

from __future__ import annotations

import math

from .._errors import FwdTransError

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("step", "cosine", "constant")


def lr_factor(schedule: str, step: int, steps_per_epoch: int, epochs: int, step_size: int = 30,
              gamma: float = 0.2) -> float:
    """The factor applied to the initial learning rate at global step ``step`` (0-based).

    Args:
        schedule: ``"step"``, ``"cosine"`` or ``"constant"``.
        step: Optimizer steps taken so far.
        steps_per_epoch: Optimizer steps in one epoch.
        epochs: Epochs of the run (``cosine`` reaches 0 at their end).
        step_size: ``step``: epochs between two decays.
        gamma: ``step``: the decay factor.

    Example:
        >>> [lr_factor("step", s, steps_per_epoch=10, epochs=100) for s in (0, 299, 300, 600)]
        [1.0, 1.0, 0.2, 0.04000000000000001]
        >>> lr_factor("cosine", 50, steps_per_epoch=10, epochs=10)
        0.5
    """
    if schedule == "step":
        return gamma ** ((step // steps_per_epoch) // step_size)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / (steps_per_epoch * epochs)))
    if schedule == "constant":
        return 1.0
    raise FwdTransError(f"schedule {schedule!r} is not an option. Fix: use one of {', '.join(SCHEDULES)}.")
