"""Gradient Guesses: the directions each block's target is projected on.

A guess is produced during the forward sweep, from what the block computed (its output ``h``, its
head's loss gradient ``g = dl/dh``, its parameters) and, for noise guesses, random draws made
before the step by :func:`draw_noise` (so that an eager and a compiled step, and both engines, use
the same numbers). Adding a guess means adding a branch here (and its name in ``_method.GUESSES``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["activity_guess", "draw_noise", "reinitialise", "weight_guess"]


def draw_noise(model, batch: int) -> list[list[Tensor]]:
    """The step's noise guesses, per block but the last: ``[(k, B, *h)]`` in activity space,
    ``[(k, *p)]`` per trained parameter in weight space; empty lists for other guesses."""
    method = model.method
    blocks = model.blocks[:-1]
    if method.kind != "projected" or method.guess not in ("gaussian", "rademacher"):
        return [[] for _ in blocks]
    like = next(model.parameters())

    def draw(shape: tuple[int, ...]) -> Tensor:
        if method.guess == "gaussian":
            return torch.randn(shape, generator=model.generator, dtype=like.dtype, device=like.device)
        return torch.randint(0, 2, shape, generator=model.generator, device=like.device).to(like.dtype) * 2 - 1

    k = method.tangents
    if method.space == "weight":
        return [[draw((k, *p.shape)) for p in b.parameters() if p.requires_grad] for b in blocks]
    return [[draw((k, batch, *shape))] for shape in model.cut_shapes]


def activity_guess(method, j: int, h: Tensor, g: Tensor | None, y: Tensor, noise: list[Tensor],
                   segments: tuple[int, ...]) -> tuple[Tensor, bool]:
    """Directions ``(k, B, *h)`` for block ``j`` and whether the projection normalises them.

    With several ``segments`` (tensors packed in ``h``, per-sample sizes) each tensor gets guesses of
    its own: ``(m * k, B, *h)``, row ``(i, t)`` being guess ``t`` restricted to tensor ``i``.
    """
    if callable(method.guess):
        v = method.guess(j, h.detach(), y)
        if v.shape != h.shape:
            raise ValueError(f"the guess callable returned shape {tuple(v.shape)} for block {j}; expected {tuple(h.shape)}")
        return _per_segment(v.detach()[None], segments, normalise=True), True
    if noise:
        return _per_segment(noise[0], segments, normalise=False), False
    return _per_segment(g[None], segments, normalise=True), True  # local, ntk, fixed-ntk: the head's loss gradient


def _per_segment(v: Tensor, segments: tuple[int, ...], normalise: bool) -> Tensor:
    if len(segments) > 1:
        parts = v.flatten(2).split(list(segments), -1)
        v = torch.cat([torch.cat([p if i == k else torch.zeros_like(p) for k, p in enumerate(parts)], -1)
                       for i in range(len(parts))]).view(-1, *v.shape[1:])
    return torch.stack([_unit(r) for r in v]) if normalise else v


def _unit(g: Tensor) -> Tensor:
    """Each sample's slice divided by its norm (zero stays zero). Normalising before the tangents
    are pushed matters: with samples mixed downstream, one stream carries every sample's guess."""
    norms = g.flatten(1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    return g / norms.view(-1, *([1] * (g.dim() - 1)))


def weight_guess(head_grads: list[Tensor] | None, noise: list[Tensor]) -> tuple[list[Tensor], bool]:
    """Directions per parameter ``(k, *p)`` for one block and whether they are normalised."""
    if noise:
        return noise, False
    return [gp[None] for gp in head_grads], True


def reinitialise(head: nn.Module, generator: torch.Generator) -> None:
    """Draw fresh parameters for an NTK head (its layers' default initialisation, seeded)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in head.modules():
            if m is not head and hasattr(m, "reset_parameters"):
                m.reset_parameters()
