"""The per-layer rules: sample ``n``'s share of a parameter's gradient, built as by the official hooks from the
layer's *own output gradient* for sample ``n`` and sample ``n``'s input to the layer, and the layer's response
to a per-sample weight (``<t_n, v_n>`` without forming ``t_n``; the forward engine's tangents).

* ``nn.Linear`` on ``(B, *pos, K)`` and ``nn.Conv{1,2,3}d`` (per group): the weight share
  ``t_n = sum_s Gt_ns X_ns^T`` (patches for a convolution), formed as a ``(chunk, O, K)`` tensor (``torch.bmm``
  for Linear; for Conv the weight gradient of a convolution whose groups are the chunk's samples, where
  Opacus's ``grad_sample`` unfolds, which measured slower on CPU). ``<t_n, v_n> = sum_s <Gt_ns, v_n X_ns>``:
  the layer run with the per-sample weights ``v_n`` (a grouped convolution) contracted with ``Gt``, so the
  target's ``t_n`` is never formed. Biases: ``sum_s G_ns``, ``(B, O)``.
* ``nn.BatchNorm*``, ``nn.LayerNorm``, ``nn.GroupNorm`` (affine): weight share ``sum_s G_ns * xhat_ns``, bias
  share ``sum_s G_ns``, ``(B, C)`` (or ``(B, *normalized_shape)``). ``xhat`` is recomputed from the recorded
  input with the statistics the layer used (batch statistics in train mode or without running statistics,
  the running ones otherwise).
* anything else: :mod:`.fallback`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fallback import Fallback
from .sites import flat_positions


class Rules(Fallback):
    """Per site and parameter: the per-sample shares, ``<t_n, v_n>``, the tangents and the batch gradient."""

    def share(self, i: int, local: str, sl: slice, g: Tensor) -> Tensor:
        """``(c, *p)``: site ``i``'s shares of its parameter ``local`` for samples ``sl`` of one output gradient."""
        if self.path == "fallback":
            return self._fallback_shares(i, sl, (g,))[local][0]
        return self.shares(i, local, sl, (g,))[0]

    def shares_summed(self, uses: list[tuple[int, str]], sl: slice, which: int) -> Tensor:
        """``(c, *p)``: a parameter's shares for samples ``sl`` from output gradient ``which``, summed over its
        sites ``uses`` (weight sharing)."""
        parts = [self.share(i, local, sl, self.grads[i][which]) for i, local in uses]
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)

    def target_dot(self, uses: list[tuple[int, str]], sl: slice, v: Tensor) -> Tensor:
        """``<t_n, v_n>`` for samples ``sl`` and per-sample directions ``v`` ``(c, *p)``, summed over the
        parameter's sites ``uses``."""
        dot = self._target_dot(*uses[0], sl, v)
        for i, local in uses[1:]:
            dot = dot + self._target_dot(i, local, sl, v)
        return dot

    def _target_dot(self, i: int, local: str, sl: slice, v: Tensor) -> Tensor:
        """``<t_n, v_n>`` for samples ``sl`` and per-sample directions ``v`` ``(c, *p)``.

        For Linear/Conv weights, the layer's response to the per-sample weight ``v_n`` contracted
        with the target's output gradient, ``sum_s <Gt_ns, v_n X_ns>`` (no ``t_n`` formed); otherwise
        ``t_n``'s share (small: a bias or a norm's affine parameter) dotted with ``v_n``.
        """
        if self.path != "fallback" and self.sites[i].kind in ("linear", "conv") and local == "weight":
            return (self._weight_response(i, sl, v) * self.grads[i][0][sl]).flatten(1).sum(1)
        return (self.share(i, local, sl, self.grads[i][0]) * v).flatten(1).sum(1)

    def site_tangent(self, i: int, local: str, sl: slice, v: Tensor) -> Tensor:
        """``(c, *out_i)``: site ``i``'s response to its parameter ``local`` moved by ``v_n`` (``(c, *p)``), on
        each sample ``n`` of ``sl`` alone: the derivative of the layer's output at sample ``n`` along ``v_n``."""
        s = self.sites[i]
        c = v.shape[0]
        out = (c, *self.rec.shapes[i][0][1:])
        if self.path != "fallback" and s.kind in ("linear", "conv") and local == "weight":
            return self._weight_response(i, sl, v)
        if self.path != "fallback" and s.kind == "linear":
            return v.view(c, *([1] * (len(out) - 2)), v.shape[-1]).expand(out)
        if self.path != "fallback" and s.kind == "conv":
            return v.view(c, v.shape[1], *([1] * (len(out) - 2))).expand(out)
        if self.path != "fallback" and s.kind in ("batchnorm", "groupnorm"):
            v = v.view(c, v.shape[1], *([1] * (len(out) - 2)))
            return v.expand(out) if local == "bias" else v * self._norm_xhat(i)[sl]
        if self.path != "fallback" and s.kind == "layernorm":
            shape = s.module.normalized_shape
            v = v.view(c, *([1] * (len(out) - 1 - len(shape))), *shape)
            return v.expand(out) if local == "bias" else v * self._norm_xhat(i)[sl]
        return self._fallback_tangent(i, local, sl, v)

    def batch_gradient(self, name: str, which: int) -> Tensor:
        """``sum_n`` of the shares of ``name`` from output gradient ``which`` (0: the target, 1: the guess), i.e.
        the ordinary batch gradient: one weight-gradient contraction for a Linear/Conv weight."""
        p = self.rec.params[name]
        total = torch.zeros_like(p)
        for i, local in self.rec.plan.uses[name]:
            g = self.grads[i][which]
            if self.path != "fallback" and self.sites[i].kind in ("linear", "conv") and local == "weight":
                total += self.weight_gradient(i, g)
            else:
                for sl in self._slices(i, 2 * p.numel()):
                    total += self.share(i, local, sl, g).sum(0)
        return total

    def weight_gradient(self, i: int, g: Tensor) -> Tensor:
        """Linear/Conv site ``i``'s ordinary weight gradient for output gradient ``g`` ``(B, *out_i)``: one
        contraction."""
        s = self.sites[i]
        w = self.rec.params[s.roles["weight"]]
        if s.kind == "linear":
            x = self._x(i)
            return torch.mm(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1])).view_as(w)
        m = s.module
        x, pads = self._conv_input(i)
        return torch.ops.aten.convolution_backward(g, x, w, None, list(m.stride), pads, list(m.dilation), False,
                                                   [0] * (x.dim() - 2), m.groups, [False, True, False])[1]

    def _weight_response(self, i: int, sl: slice, v: Tensor) -> Tensor:
        """``(c, *out_i)``: Linear/Conv site ``i`` run on samples ``sl`` with the per-sample weights ``v``
        ``(c, *weight)``, without bias (a batched matmul; a convolution whose groups are the samples' groups)."""
        s, c = self.sites[i], v.shape[0]
        out = (c, *self.rec.shapes[i][0][1:])
        if s.kind == "linear":
            return torch.bmm(flat_positions(self._x(i)[sl]), v.transpose(1, 2)).view(out)
        m = s.module
        x, pads = self._conv_input(i)
        return torch.ops.aten.convolution(x[sl].reshape(1, c * m.in_channels, *x.shape[2:]),
                                          v.reshape(c * m.out_channels, *v.shape[2:]), None, list(m.stride), pads,
                                          list(m.dilation), False, [0] * (x.dim() - 2), c * m.groups).view(out)

    # -- per-sample shares (materialised): one (c, *p) tensor per output gradient given
    def shares(self, i: int, local: str, sl: slice, grads: tuple[Tensor, ...]) -> list[Tensor]:
        """Site ``i``'s shares of its parameter ``local`` for samples ``sl``, one per gradient in ``grads``."""
        s = self.sites[i]
        if s.kind == "linear":
            if local == "bias":
                return [flat_positions(g[sl]).sum(1) for g in grads]
            x = flat_positions(self._x(i)[sl])  # (c, T, K)
            return [torch.bmm(flat_positions(g[sl]).transpose(1, 2), x) for g in grads]  # (c, O, K)
        if s.kind == "conv":
            if local == "bias":
                return [g[sl].flatten(2).sum(-1) for g in grads]
            return [self._conv_weight_shares(i, sl, g[sl]) for g in grads]
        if s.kind in ("batchnorm", "layernorm", "groupnorm"):
            return [self._norm_shares(i, local, sl, g[sl]) for g in grads]
        return list(self._fallback_shares(i, sl, grads)[local])

    def _conv_weight_shares(self, i: int, sl: slice, g: Tensor) -> Tensor:
        """``(c, *weight)``: the weight gradient of a convolution whose groups are the chunk's samples
        times the layer's groups (group ``(n, k)`` pairs sample ``n``'s channels of group ``k``)."""
        m = self.sites[i].module
        x, pads = self._conv_input(i)
        x = x[sl]
        c = g.shape[0]
        shape = (c * m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        gw = torch.ops.aten.convolution_backward(
            g.reshape(1, c * m.out_channels, *g.shape[2:]), x.reshape(1, c * m.in_channels, *x.shape[2:]),
            g.new_zeros(()).expand(shape), None, list(m.stride), pads, list(m.dilation), False, [0] * (x.dim() - 2),
            c * m.groups, [False, True, False])[1]
        return gw.view(c, m.out_channels, *shape[1:])

    def _norm_shares(self, i: int, local: str, sl: slice, g: Tensor) -> Tensor:
        s = self.sites[i]
        c = g.shape[0]
        if s.kind == "layernorm":
            pshape = s.module.normalized_shape
            g3 = g.reshape(c, -1, math.prod(pshape))  # (c, M, N)
            if local == "bias":
                return g3.sum(1).view(c, *pshape)
            xh = self._norm_xhat(i)[sl].reshape(g3.shape)
            return (g3 * xh).sum(1).view(c, *pshape)
        g3 = g.reshape(c, g.shape[1], -1)  # (c, C, positions)
        if local == "bias":
            return g3.sum(-1)
        xh = self._norm_xhat(i)[sl].reshape(g3.shape)
        return (g3 * xh).sum(-1)  # measured faster than einsum's batched dot products on CPU
