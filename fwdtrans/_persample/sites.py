"""The sites of one projection: their output gradients, recorded inputs and sizes, the chunking of the
samples, and the cost model choosing between the ghost and the materialised rule for a Linear/Conv weight.

Memory: per-sample tensors live one chunk at a time. By default a chunk holds as many samples as keep them
within a quarter of what the block holds when its projection starts (every layer's recorded input and output
gradients for the whole batch); ``chunk=`` overrides. Each site's tensors are released once its parameters
are done.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .._errors import FwdTransError
from .records import PerSampleRecord


def flat_positions(x: Tensor) -> Tensor:
    """``(B, *pos, F)`` -> ``(B, T, F)``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Sites:
    """One projection's sites: their output gradients, recorded inputs, sizes and the chunking.

    ``grads[i]`` holds site ``i``'s output gradients ``(B, *out)``: ``(target, guess)``, or
    ``(target,)`` with noise guesses; ``(guess,)`` or ``()`` for the forward engine.
    """

    def __init__(self, rec: PerSampleRecord, grads: list[tuple[Tensor, ...]], eps: float, chunk: int | None,
                 path: str):
        self.rec, self.grads, self.eps, self.chunk, self.path = rec, list(grads), eps, chunk, path
        if rec.records is None:
            raise FwdTransError("per-sample projection: this record was already projected")
        self.records: list[tuple] = list(rec.records)
        self.sites = rec.plan.sites
        self.done: set[str] = set()
        self._pending = [len(site.roles) for site in self.sites]  # parameters still to estimate, per site
        self._checked: set[int] = set()  # fallback sites checked not to mix samples
        self._xhat: dict[int, Tensor] = {}
        self._conv_in: dict[int, tuple[Tensor, list[int]]] = {}
        # what the block holds for the whole batch: every layer's recorded inputs and output gradients
        self._budget = 0
        for tensors in (*self.records, *self.grads):
            self._budget += sum(int(t.numel()) for t in tensors if isinstance(t, Tensor))

    def finished(self, name: str) -> None:
        """``name`` is estimated: mark it done, and release the sites whose parameters are all done."""
        self.done.add(name)
        for i, _ in self.rec.plan.uses[name]:
            self._pending[i] -= 1
            if not self._pending[i]:
                self.release(i)

    def release(self, i: int) -> None:
        """Site ``i`` is done: drop its output gradients, recorded inputs and caches."""
        self.grads[i], self.records[i] = (), ()
        self._xhat.pop(i, None)
        self._conv_in.pop(i, None)

    # -- sizes and the cost model
    def _x(self, i: int) -> Tensor:
        return self.records[i][0]

    def sizes(self, i: int) -> tuple[int, int, int, int]:
        """Linear/conv site: positions ``P``, then ``K`` and ``O`` per group, and the groups."""
        s, x = self.sites[i], self._x(i)
        m = s.module
        if s.kind == "linear":
            return x[0].numel() // x.shape[-1], m.in_features, m.out_features, 1
        g = m.groups
        return self._out_positions(i), m.in_channels // g * math.prod(m.kernel_size), m.out_channels // g, g

    def _out_positions(self, i: int) -> int:
        x, pads = self._conv_input(i)
        m = self.sites[i].module
        n = 1
        for j, (size, k, s, d) in enumerate(zip(x.shape[2:], m.kernel_size, m.stride, m.dilation, strict=True)):
            n *= (size + 2 * pads[j] - d * (k - 1) - 1) // s + 1
        return n

    def rule(self, i: int) -> str:
        """``"ghost"`` or ``"materialise"`` for a Linear/Conv weight: FLOPs per sample (and group)."""
        if self.path in ("ghost", "materialise"):
            return self.path
        p, k, o, _ = self.sizes(i)
        patches = p * k if self.sites[i].kind == "conv" else 0
        ghost = p * p * (k + 2 * o) + p * k * o + patches  # Grams, then one weight-gradient contraction
        return "ghost" if ghost < 2 * p * k * o else "materialise"  # t_n and g_n

    def _slices(self, i: int, per_sample: int) -> list[slice]:
        """Chunks of samples, each of at most ``budget // per_sample`` samples (``chunk=`` overrides).

        ``budget`` is a quarter of what the block holds for the whole batch when its projection
        starts (every layer's recorded inputs and output gradients): in the engine's backward walk the
        records of the earlier blocks are alive too, so a chunk adds little to the step's peak.
        """
        b = self.rec.batch
        if self.chunk is not None:
            c = max(1, min(b, self.chunk))
        else:
            c = max(1, min(b, self._budget // 4 // max(1, per_sample)))
        return [slice(a, min(a + c, b)) for a in range(0, b, c)]

    # -- convolution geometry
    def _conv_input(self, i: int) -> tuple[Tensor, list[int]]:
        """The conv input, padded explicitly unless the padding is symmetric zeros; the symmetric pads."""
        if i not in self._conv_in:
            m, x = self.sites[i].module, self._x(i)
            nd = x.dim() - 2
            if isinstance(m.padding, str):
                same = m.padding == "same"
                total = [d * (k - 1) if same else 0 for d, k in zip(m.dilation, m.kernel_size, strict=True)]
                pads = [(t // 2, t - t // 2) for t in total]  # 'same': the extra one on the right, as aten
            else:
                pads = [(p, p) for p in m.padding]
            if m.padding_mode != "zeros":
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                sym = [0] * nd
            elif any(a != b for a, b in pads):
                x = F.pad(x, [v for a, b in reversed(pads) for v in (a, b)])
                sym = [0] * nd
            else:
                sym = [a for a, _ in pads]
            self._conv_in[i] = (x, sym)
        return self._conv_in[i]

    def _norm_xhat(self, i: int) -> Tensor:
        """The normalised input, with the statistics the layer used."""
        if i not in self._xhat:
            s, x = self.sites[i], self._x(i)
            m = s.module
            if s.kind == "batchnorm":
                rm = self.rec.old_buffers.get(f"{s.prefix}.running_mean", m.running_mean)
                rv = self.rec.old_buffers.get(f"{s.prefix}.running_var", m.running_var)
                batch_stats = m.training or rm is None
                self._xhat[i] = F.batch_norm(x, None if batch_stats else rm, None if batch_stats else rv,
                                             training=batch_stats, momentum=0.0, eps=m.eps)
            elif s.kind == "layernorm":
                self._xhat[i] = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            else:
                self._xhat[i] = F.group_norm(x, m.num_groups, eps=m.eps)
        return self._xhat[i]
