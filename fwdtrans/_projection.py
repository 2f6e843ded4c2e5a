"""Projection formulas shared by both engines: from directional derivatives to an estimate.

Every estimate has the form of the paper's Eq. 1, ``g = <t, v> v`` for a target gradient ``t`` and
a guess ``v``, applied per *projection unit* (a sample in activity space; a parameter tensor, a
block, or all blocks in weight space). With ``k`` guesses per unit the estimates are averaged or
replaced by the orthogonal projection onto their span.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._errors import FwdTransError

__all__ = ["combine", "span"]


def combine(d: Tensor, v: Tensor, *, normalise: bool, aggregation: str) -> Tensor:
    """Estimate per unit from ``d = <t, v_i>`` (shape ``(k, U)``) and guesses ``v`` (``(k, U, D)``).

    ``normalise`` makes each guess a unit direction (``<t, v> v / |v|^2``), as for head guesses;
    noise guesses are used as drawn. ``aggregation="project"`` returns ``V (V^T V)^-1 V^T t``.
    A unit whose guesses are zero carries no direction: its estimate is zero.
    """
    if aggregation == "project":
        gram = torch.einsum("iud,jud->uij", v, v)
        empty = gram.diagonal(dim1=-2, dim2=-1).sum(-1) == 0  # a unit whose guesses are zero: its estimate is zero
        gram = gram + empty[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        eig = torch.linalg.eigvalsh(gram)
        chol, info = torch.linalg.cholesky_ex(gram)
        singular = eig[:, 0] <= eig[:, -1] * gram.shape[-1] * torch.finfo(v.dtype).eps * 10
        if int(info.max()) > 0 or bool(singular.any()):
            raise FwdTransError(
                "aggregation='project': the guesses of a projection unit are linearly dependent (singular Gram "
                "matrix), so their span has lower rank than tangents. Fix: use fewer tangents than the unit's "
                "dimension, or aggregation='mean'."
            )
        coef = torch.cholesky_solve(d.T.unsqueeze(-1), chol).squeeze(-1)  # (U, k)
        return torch.einsum("ui,iud->ud", coef, v)
    if normalise:
        norm2 = (v * v).sum(-1)
        d = torch.where(norm2 > 0, d / norm2.clamp_min(torch.finfo(v.dtype).tiny), 0)
    return (d.unsqueeze(-1) * v).mean(0)


def span(d: Tensor, u: Tensor) -> Tensor:
    """Each sample's target projected on the span of the batch's guesses (paper Table 6).

    ``u``: guesses ``(B, D)``; ``d[m, n] = <t_n, u_m>``. Returns ``(B, D)``:
    ``est_n = U (U^T U)^+ U^T t_n``.
    """
    gram = u @ u.T
    return (torch.linalg.pinv(gram, hermitian=True) @ d).T @ u
