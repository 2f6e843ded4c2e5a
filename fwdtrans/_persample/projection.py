"""Projection: forming the per-sample estimate ``sum_n <t_n, g_n> / (|g_n|^2 + eps) * g_n`` of every trained
parameter from a :func:`~.records.record` and the target's and the guess's cotangents at the block output
(:func:`project`: two pull-backs through the block).

For a Linear/Conv weight, two ways, chosen per layer by a FLOP count per sample and group (``P`` output
positions, ``K = C_in/groups * prod(kernel)``, ``O = C_out/groups``):

- *ghost* (ghost clipping's per-sample norms, extended to inner products):
  ``<t_n, g_n> = sum_{s,s'} <Gt_ns, Gg_ns'> <X_ns, X_ns'>`` and ``|g_n|^2`` alike, from ``(P, P)`` Gram matrices
  (im2col patches for a convolution): ``P^2 (K + 2 O)``; then ``sum_n c_n g_n`` is one ordinary weight-gradient
  contraction of the guess's output gradient scaled by ``c_n``, ``P K O``;
- *materialised*: ``g_n`` formed chunk by chunk (:mod:`.rules`) and ``<t_n, g_n>`` read as the layer run with
  the per-sample weights ``g_n`` contracted with ``Gt``: ``2 P K O``; ``|g_n|^2`` and ``sum_n c_n g_n`` follow
  chunk by chunk.

Ghost is chosen when ``P^2 (K + 2 O) + P K O (+ P K for the patches) < 2 P K O``: for a Linear on ``(B, K)``
(``P = 1``, outer products: ``<t_n, g_n> = <Gt_n, Gg_n> |X_n|^2``) unless ``K`` or ``O`` is tiny, and for the
late, small feature maps of a CNN; materialised for the early, large ones. Every other parameter is
materialised (its shares are small), as is a parameter used by several nodes (weight sharing): its shares
``g_n`` are summed over the nodes, and ``<t_n, g_n>`` over the nodes' contributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .._errors import FwdTransError
from .records import PerSampleRecord, record
from .rules import Rules
from .sites import flat_positions

PATHS = ("auto", "ghost", "materialise", "fallback")


def projected(dot: Tensor, g: Tensor, eps: float) -> Tensor:
    """``sum_n dot_n / (|g_n|^2 + eps) * g_n`` over the samples of ``g`` ``(c, *p)``, shaped ``p``."""
    gf = g.flatten(1)
    return ((dot / (torch.linalg.vector_norm(gf, dim=1).square() + eps)) @ gf).view(g.shape[1:])


def check_args(rec: PerSampleRecord, guess_cot: Tensor | None, noise: dict[str, Tensor] | None,
               path: str) -> Callable[[Any], tuple]:
    """The record's pull-back, once an unknown ``path``, a missing guess, noise not shaped ``(B, *p)`` per
    parameter and a record already projected are refused."""
    if path not in PATHS:
        raise FwdTransError(f"path={path!r}: expected one of {PATHS}")
    if noise is None and guess_cot is None:
        raise FwdTransError("per-sample projection: give guess_cot (a guess loss's cotangent) or noise")
    if rec.pull is None:
        raise FwdTransError("per-sample projection: this record was already projected (a record is projected once)")
    for name in rec.plan.uses:
        if noise is not None and name not in noise:
            raise FwdTransError(f"noise has no draw for the trained parameter {name!r}: pass one (B, *p) "
                                "tensor per trained parameter")
        if noise is not None and noise[name].shape != (rec.batch, *rec.params[name].shape):
            raise FwdTransError(f"noise[{name!r}] has shape {tuple(noise[name].shape)}; expected "
                                f"{(rec.batch, *rec.params[name].shape)}")
    return rec.pull


def per_sample_projection(block: fx.GraphModule, params: dict[str, Tensor], buffers: dict[str, Tensor],
                          inputs: tuple[Tensor, ...], target_cot: Tensor, guess_cot: Tensor | None,
                          noise: dict[str, Tensor] | None = None, eps: float = 1e-16,
                          chunk: int | None = None, path: str = "auto") -> dict[str, Tensor]:
    """The per-sample weight-space estimate for every trained parameter of ``block`` (by name).

    ``sum_n <t_n, g_n> / (|g_n|^2 + eps) * g_n`` per parameter tensor, ``t_n`` and ``g_n`` sample
    ``n``'s shares of the target's and the guess's batch gradient. ``target_cot`` and ``guess_cot``
    are the cotangents of the target and guess losses at the block's output (batch tensors
    ``(B, *out)``); the forward is ``functional_call(block, (params, cloned buffers), inputs)``.
    With ``noise`` (per trained parameter, ``(B, *p)`` draws ``v_n``) the estimate is
    ``sum_n <t_n, v_n> / (|v_n|^2 + eps) v_n``, the official code's random guess, and ``guess_cot``
    is not used. ``chunk`` bounds the samples whose per-sample tensors are alive at once (default:
    automatic). ``path`` forces a rule for Linear/Conv weights (``"ghost"``, ``"materialise"``) or the
    vmap fallback for every layer (``"fallback"``); ``"auto"`` chooses per layer by cost.

    This runs the block's forward once more than a caller that keeps its forward (see
    :func:`record` and :func:`project`, which the engine uses).
    """
    rec = record(block, params, buffers, inputs)
    return project(rec, target_cot, guess_cot, noise=noise, eps=eps, chunk=chunk, path=path)[0]


def project(rec: PerSampleRecord, target_cot: Tensor, guess_cot: Tensor | None,
            noise: dict[str, Tensor] | None = None, eps: float = 1e-16, chunk: int | None = None,
            path: str = "auto", batch: dict[str, dict[str, Tensor]] | None = None
            ) -> tuple[dict[str, Tensor], tuple[Tensor, ...] | None]:
    """The estimates of :func:`per_sample_projection` from a :func:`record`; also the target's
    cotangents at the block's inputs if the record was made ``wrt_inputs`` (else ``None``).

    A record is projected once: its pull-back and recorded inputs are released on the way (each
    layer's as soon as its parameters are estimated), so that the block's memory goes as the
    estimates are formed.

    ``batch``, when given, receives every parameter's batch gradient of the target
    (``batch["target"]``, ``sum_n t_n``) and of the guess (``batch["guess"]``: ``sum_n g_n``, or the
    noise summed over the samples), for ``fwdtrans.check``: one more weight-gradient contraction per
    layer (Linear and Conv weights; the other shares are small and summed).
    """
    pull = check_args(rec, guess_cot, noise, path)
    # two pull-backs (stacking the cotangents under vmap measured slower on CPU): per site, its output
    # gradient for the target and for the guess, BatchNorm coupling included
    tgrads = pull(target_cot)
    inputs_cot = tgrads[1:]
    grads: list[tuple[Tensor, ...]]
    if noise is not None:
        grads = [(gt,) for gt in tgrads[0]]
    else:
        grads = [(gt, gg) for gt, gg in zip(tgrads[0], pull(guess_cot)[0], strict=True)]
    del tgrads, pull
    rec.pull = None  # the block's saved activations: only the recorded inputs are still needed
    ctx = Context(rec, grads, eps, chunk, path)
    rec.records = None
    est = {name: torch.zeros_like(p) for name, p in rec.params.items()}
    for name, uses in rec.plan.uses.items():
        if name in ctx.done:
            continue
        if noise is not None:
            est[name] = ctx.noise(name, uses, noise[name])
            names = [name]
        elif len(uses) == 1 and path != "fallback":
            i, _ = uses[0]
            names = [n for n in rec.plan.sites[i].roles.values() if len(rec.plan.uses[n]) == 1]
            est.update(ctx.single_site(i, names))
        else:
            est[name] = ctx.materialised(name, uses)
            names = [name]
        for n in names:
            if batch is not None:
                batch.setdefault("target", {})[n] = ctx.batch_gradient(n, 0)
                batch.setdefault("guess", {})[n] = ctx.batch_gradient(n, 1) if noise is None else noise[n].sum(0)
            ctx.finished(n)
    if batch is not None:  # a trained parameter no node uses: zero gradients
        for name, p in rec.params.items():
            for key in ("target", "guess"):
                batch.setdefault(key, {}).setdefault(name, torch.zeros_like(p))
    return est, (inputs_cot if rec.wrt_inputs else None)


def choices(rec: PerSampleRecord, path: str = "auto") -> list[dict]:
    """Per site of a :func:`record`: node, kind, positions/sizes and the rule the cost model picks."""
    ctx = Context(rec, [()] * len(rec.plan.sites), 0.0, None, path)
    rows = []
    for i, s in enumerate(rec.plan.sites):
        row: dict[str, Any] = {"node": s.node, "kind": s.kind, "params": list(s.roles.values())}
        if s.kind in ("linear", "conv"):
            p, k, o, g = ctx.sizes(i)
            row.update(positions=p, K=k, O=o, groups=g, rule=ctx.rule(i))
        rows.append(row)
    return rows


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    return c.view(*c.shape, *([1] * (like.dim() - c.dim())))


class Context(Rules):
    """One :func:`project` call: the estimators, chunk by chunk over the samples."""

    def single_site(self, i: int, names: list[str]) -> dict[str, Tensor]:
        """Every parameter of site ``i`` used nowhere else."""
        s = self.sites[i]
        inv = {full: loc for loc, full in s.roles.items()}
        out = {}
        for name in names:
            local = inv[name]
            if s.kind in ("linear", "conv") and local == "weight" and self.rule(i) == "ghost":
                out[name] = self._ghost(i)
            else:
                out[name] = self.materialised(name, [(i, local)])
        return out

    def materialised(self, name: str, uses: list[tuple[int, str]]) -> Tensor:
        """``sum_n c_n g_n`` chunk by chunk, ``g_n`` summed over the parameter's sites.

        Only ``g_n`` is formed: ``<t_n, g_n>`` is read off the target's output gradient (see
        :meth:`~.rules.Rules.target_dot`), which for Linear/Conv weights costs one layer forward with the per-sample
        weights ``g_n`` instead of forming ``t_n`` (measured 1.2-1.6x faster on CPU, half the memory).
        """
        p = self.rec.params[name]
        acc = torch.zeros_like(p)
        for sl in self._slices(uses[0][0], 2 * p.numel()):
            g = self.shares_summed(uses, sl, 1)
            acc += projected(self.target_dot(uses, sl, g), g, self.eps)
        return acc

    def noise(self, name: str, uses: list[tuple[int, str]], v: Tensor) -> Tensor:
        """``sum_n <t_n, v_n> / (|v_n|^2 + eps) v_n`` for per-sample noise ``v`` ``(B, *p)``."""
        p = self.rec.params[name]
        acc = torch.zeros_like(p)
        for sl in self._slices(uses[0][0], p.numel()):
            vs = v[sl]
            acc += projected(self.target_dot(uses, sl, vs), vs, self.eps)
        return acc

    def _ghost(self, i: int) -> Tensor:
        """Ghost inner products from Gram matrices over positions, then one weight-gradient
        contraction of the guess's output gradient scaled by ``c_n``."""
        s = self.sites[i]
        p, k, o, grp = self.sizes(i)
        per = p * k * grp + 3 * grp * p * p if s.kind == "conv" else 3 * p * p  # patches and Grams
        gt_all, gg_all = self.grads[i]
        dots, norms = [], []
        for sl in self._slices(i, per):
            if s.kind == "linear":
                x = flat_positions(self._x(i)[sl])  # (c, T, K)
                gt, gg = flat_positions(gt_all[sl]), flat_positions(gg_all[sl])
                if x.shape[1] == 1:  # outer products: <a b^T, c b^T> = <a, c> |b|^2
                    xx = (x * x).sum((1, 2))
                    dots.append((gt * gg).sum((1, 2)) * xx)
                    norms.append((gg * gg).sum((1, 2)) * xx)
                    continue
                gram_x = torch.bmm(x, x.transpose(1, 2))
                gram_tg = torch.bmm(gt, gg.transpose(1, 2))
                gram_gg = torch.bmm(gg, gg.transpose(1, 2))
            else:
                u = self._patches(i, sl)  # (c, groups, K, P)
                gram_x = torch.matmul(u.transpose(-1, -2), u)
                c = u.shape[0]
                gt = gt_all[sl].reshape(c, grp, o, p)
                gg = gg_all[sl].reshape(c, grp, o, p)
                gram_tg = torch.matmul(gt.transpose(-1, -2), gg)
                gram_gg = torch.matmul(gg.transpose(-1, -2), gg)
            dots.append((gram_x * gram_tg).flatten(1).sum(1))
            norms.append((gram_x * gram_gg).flatten(1).sum(1))
        coeff = torch.cat(dots) / (torch.cat(norms) + self.eps)
        return self.weight_gradient(i, gg_all * _bcast(coeff, gg_all))

    def _patches(self, i: int, sl: slice) -> Tensor:
        """The conv's input patches for samples ``sl``: ``(c, groups, C_in/groups * prod(kernel), P)``."""
        m = self.sites[i].module
        x, pads = self._conv_input(i)
        x = x[sl]
        c, grp, nd = x.shape[0], m.groups, x.dim() - 2
        if nd == 2:  # im2col
            u = F.unfold(x, m.kernel_size, m.dilation, tuple(pads), m.stride)
            return u.view(c, grp, -1, u.shape[-1])
        if any(pads):
            x = F.pad(x, [v for p in reversed(pads) for v in (p, p)])
        for j, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation, strict=True)):
            x = x.unfold(2 + j, d * (k - 1) + 1, s)[..., ::d]  # appends the window dim
        out_sp = x.shape[2:2 + nd]
        # (c, C_in, *out, *k) -> (c, groups, C_in/groups, *k, *out)
        x = x.reshape(c, grp, m.in_channels // grp, *out_sp, *m.kernel_size)
        perm = [0, 1, 2, *range(3 + nd, 3 + 2 * nd), *range(3, 3 + nd)]
        return x.permute(perm).reshape(c, grp, -1, math.prod(out_sp))
