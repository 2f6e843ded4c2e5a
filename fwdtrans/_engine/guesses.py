"""Gradient Guesses: the directions each block's target is projected on, one class per kind.

A guess is formed during the forward sweep from what the block computed (its output ``h``, its
head's loss gradient ``g = dl/dh``, the block's parameter gradient of that loss) or, for noise, from
random draws made before the step by :meth:`Guess.draw` (so that an eager and a compiled step, and
both engines, use the same numbers). The space asks for the guess where it lives: at the block
output (:meth:`Guess.at_output`) or in the block's parameters (:meth:`Guess.at_params`).

Adding a guess: a :class:`Guess` subclass, one entry in :data:`GUESSES`, and its name in
``_method.GuessName``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._errors import FwdTransError
from .._method import Method

__all__ = ["GUESSES", "Guess", "guess_for", "reinitialise"]


class Guess:
    """One kind of Gradient Guess. ``normalise``: projections divide by ``|v|^2`` (noise is used as drawn)."""

    normalise = True

    def prepare(self, heads: Sequence[nn.Module], generator: torch.Generator) -> None:
        """Before the step, outside the compiled function (NTK guesses re-draw their heads here)."""

    def draw(self, shapes: Sequence[tuple[int, ...]], generator: torch.Generator, like: Tensor) -> list[Tensor]:
        """The step's random draws for one block, one per shape (none for a guess that draws nothing)."""
        return []

    def at_output(self, j: int, h: Tensor, g: Tensor, y: Tensor, noise: list[Tensor]) -> Tensor:
        """Directions ``(k, B, *h)`` at block ``j``'s output ``h``."""
        raise NotImplementedError

    def at_params(self, head_grads: Callable[[], list[Tensor]], noise: list[Tensor]) -> list[Tensor]:
        """Directions ``(k, *p)`` per trained parameter of the block; ``head_grads()`` gives ``dl/dtheta``."""
        raise NotImplementedError

    def at_samples(self, noise: list[Tensor]) -> list[Tensor] | None:
        """Per-sample weight space: the per-sample directions ``(B, *p)`` per trained parameter (noise), or
        ``None`` when they are the per-sample shares of the head loss's parameter gradient (head guesses)."""
        raise NotImplementedError


class HeadGuess(Guess):
    """``"local"`` and ``"fixed-ntk"``: the gradient of the block's head loss."""

    def at_output(self, j, h, g, y, noise):
        return g[None]

    def at_params(self, head_grads, noise):
        return [gp[None] for gp in head_grads()]

    def at_samples(self, noise):
        return None


class RedrawnHeadGuess(HeadGuess):
    """``"ntk"``: the head's gradient, with the head re-initialised before every step."""

    def prepare(self, heads, generator):
        for head in heads:
            reinitialise(head, generator)


class NoiseGuess(Guess):
    """``"gaussian"`` and ``"rademacher"``: random directions, used as drawn (unbiased, not normalised)."""

    normalise = False

    def __init__(self, sample: Callable[[tuple[int, ...], torch.Generator, Tensor], Tensor]):
        self.sample = sample

    def draw(self, shapes, generator, like):
        return [self.sample(shape, generator, like) for shape in shapes]

    def at_output(self, j, h, g, y, noise):
        return noise[0]

    def at_params(self, head_grads, noise):
        return noise

    def at_samples(self, noise):
        return noise


class CallableGuess(Guess):
    """A user's ``guess(j, h, y)``: an activity-space direction shaped like ``h``."""

    def __init__(self, fn: Callable[[int, Tensor, Tensor], Tensor]):
        self.fn = fn

    def at_output(self, j, h, g, y, noise):
        v = self.fn(j, h.detach(), y)
        if v.shape != h.shape:
            raise FwdTransError(f"guess callable: the guess callable returned shape {tuple(v.shape)} for block {j}; "
                                f"expected {tuple(h.shape)}")
        return v.detach()[None]


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


def _rademacher(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


# The guesses by name ("global" is no guess: the exact gradient, i.e. backprop).
GUESSES: dict[str, Callable[[], Guess]] = {
    "local": HeadGuess,
    "ntk": RedrawnHeadGuess,
    "fixed-ntk": HeadGuess,
    "gaussian": lambda: NoiseGuess(_gaussian),
    "rademacher": lambda: NoiseGuess(_rademacher),
}


def guess_for(method: Method) -> Guess:
    """The method's guess (a forward-gradient method: ``method.kind`` is ``"projected"`` or ``"local"``)."""
    return CallableGuess(method.guess) if callable(method.guess) else GUESSES[method.guess]()


def reinitialise(head: nn.Module, generator: torch.Generator) -> None:
    """Draw fresh parameters for an NTK head (its layers' default initialisation, seeded)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in head.modules():
            reset = getattr(m, "reset_parameters", None)
            if m is not head and callable(reset):
                reset()
