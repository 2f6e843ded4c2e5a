"""The fallback rule: any other node holding a trained parameter (another module, or a parameter used by a
``call_function``/``call_method`` node) gets ``torch.func.vmap`` over samples (in chunks) of the node's own
``vjp`` with respect to its parameters, fed with the node's output gradient (the official hooks' rule), and
its ``jvp`` for the forward engine's tangents. Exact when the node does not mix samples; that is checked
(eagerly, one extra forward of the node): a node that mixes samples (e.g. a custom normalisation with batch
statistics) raises :class:`~fwdtrans.FwdTransError` naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx
from torch.func import functional_call, jvp, vjp, vmap

from .._errors import FwdTransError
from .graph import Ref
from .sites import Sites


class Fallback(Sites):
    """The vmap fallback of every site without a rule of its own (and of every site with ``path="fallback"``)."""

    def _site_call(self, i: int, pvals: dict[str, Tensor], recs: tuple) -> Tensor:
        """Site ``i``'s node run as written, with parameters ``pvals`` (by local name) and recorded inputs ``recs``."""
        s = self.sites[i]
        if s.kind == "function":
            def val(a: Any) -> Any:
                if not isinstance(a, Ref):
                    return a
                if a.kind == "param":
                    return pvals[str(a.ref)]
                return self.rec.plan.gm.get_parameter(str(a.ref)) if a.kind == "frozen" else recs[int(a.ref)]
            args, kwargs = fx.node.map_aggregate(s.args, val)
            assert s.call is not None
            return s.call(*args, **kwargs)
        m = s.module
        local_p = {k: pvals[k] for k in s.roles}
        local_b = {k: b.clone() for k, b in m.named_buffers()}
        call_args: Any = ((recs[0],), {})
        if s.kind == "module":
            it = iter(recs)
            call_args = fx.node.map_arg(s.args, lambda _: next(it))
        return functional_call(m, (local_p, local_b), tuple(call_args[0]), dict(call_args[1]))

    def _fallback_args(self, i: int, sl: slice) -> tuple[dict[str, Tensor], tuple[int | None, ...], tuple]:
        """Site ``i``'s parameters by local name, which recorded inputs are batched, and those of samples ``sl``;
        the site is checked (once, eagerly) not to mix the samples."""
        s = self.sites[i]
        recs = self.records[i]
        batch = self.rec.batch
        pvals = {loc: self.rec.params[full] for loc, full in s.roles.items()}
        dims = tuple(0 if isinstance(r, Tensor) and r.dim() > 0 and r.shape[0] == batch else None for r in recs)
        if all(d is None for d in dims):
            # a parameter expanded to the batch by a size read from the input (a class token): row n is sample n's
            sizes = [r for r in recs if not isinstance(r, Tensor)]
            sized = any(r == batch or isinstance(r, tuple) and r[:1] == (batch,) for r in sizes)
            if sized and self.rec.shapes[i][0][:1] == (batch,):
                return pvals, dims, recs
            raise FwdTransError(f"per-sample projection: node {s.node!r} uses trained parameters "
                                f"{sorted(s.roles.values())} but none of its inputs is batched; no per-sample "
                                "share exists. Fix: freeze them, or use another weight-space granularity.")
        part = tuple(r[sl] if d == 0 else r for r, d in zip(recs, dims, strict=True))
        if not torch.compiler.is_compiling() and i not in self._checked:
            self._check_per_sample(i, pvals, recs, dims)
            self._checked.add(i)
        return pvals, dims, part

    def _fallback_shares(self, i: int, sl: slice, grads: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """Shares ``(S, c, *p)`` of every parameter of site ``i`` for samples ``sl``, per gradient given."""
        gs = torch.stack([g[sl] for g in grads])
        pvals, dims, part = self._fallback_args(i, sl)
        if all(d is None for d in dims):  # sample n's share: the pull-back of its row of the output gradient
            pull = vjp(lambda p: self._site_call(i, p, part), pvals)[1]
            rows = gs.new_zeros(*gs.shape[:2], *self.rec.shapes[i][0])
            n = torch.arange(gs.shape[1], device=gs.device)
            rows[:, n, n + sl.start] = gs
            return vmap(vmap(lambda r: pull(r)[0]))(rows)

        def one(g: Tensor, *r: Tensor) -> dict[str, Tensor]:
            r = tuple(x[None] if d == 0 else x for x, d in zip(r, dims, strict=True))
            pull = vjp(lambda p: self._site_call(i, p, r), pvals)[1]
            return pull(g[None])[0]

        return vmap(vmap(one, in_dims=(0, *dims)), in_dims=(0, *([None] * len(dims))))(gs, *part)

    def _check_per_sample(self, i: int, pvals: dict[str, Tensor], recs: tuple, dims: tuple[int | None, ...]) -> None:
        """Refuse a fallback node whose output for one sample depends on the other samples."""
        s = self.sites[i]
        try:
            whole = self._site_call(i, pvals, recs)
            def one(*r: Tensor) -> Tensor:
                return self._site_call(i, pvals, tuple(x[None] if d == 0 else x
                                                       for x, d in zip(r, dims, strict=True)))[0]
            each = vmap(one, in_dims=dims)(*recs)
        except Exception as e:  # noqa: BLE001 - any failure of the per-sample call is the user's node
            raise FwdTransError(f"per-sample projection: node {s.node!r} ({s.kind}) could not be run one sample at a "
                                f"time under vmap: {e} Fix: freeze its parameters, or use another weight-space "
                                "granularity.") from None
        tol = 1e-10 if whole.dtype == torch.float64 else 1e-4
        if whole.shape != each.shape or not torch.allclose(whole, each, rtol=tol, atol=tol * whole.abs().max().item()):
            raise FwdTransError(f"per-sample projection: node {s.node!r} ({s.kind}) mixes the samples of the batch "
                                "(its output for one sample depends on the others), so its per-sample share cannot "
                                "be derived from its own output gradient. Fix: freeze its parameters, or use a "
                                "supported layer (Linear, Conv, BatchNorm, LayerNorm, GroupNorm).")

    def _fallback_tangent(self, i: int, local: str, sl: slice, v: Tensor) -> Tensor:
        """``(c, *out_i)``: site ``i``'s own jvp along ``v_n`` for its parameter ``local``, one sample at a time."""
        c = v.shape[0]
        pvals, dims, part = self._fallback_args(i, sl)
        if all(d is None for d in dims):  # an output batched from the parameters alone: sample n's row
            n = torch.arange(c, device=v.device)
            site = vmap(lambda vn: jvp(lambda p: self._site_call(i, {**pvals, local: p}, part), (pvals[local],),
                                       (vn,))[1])(v)
            return site[n, n + sl.start]

        def one(vn: Tensor, *r: Tensor) -> Tensor:
            r = tuple(x[None] if d == 0 else x for x, d in zip(r, dims, strict=True))
            return jvp(lambda p: self._site_call(i, {**pvals, local: p}, r), (pvals[local],), (vn,))[1][0]

        return vmap(one, in_dims=(0, *dims))(v, *part)
