"""The tangent engine: compute every parameter's gradient for one batch.

Three kinds of method share the blocks' forward pass:

* ``backprop`` (global target, global guess): ``loss.backward()`` through the chained blocks.
* ``local`` (local target, local guess): each block learns from its own head's loss, the last
  block from the global loss; no gradient crosses a cut.
* ``projected`` (global target, local guess, activity space; the paper's Eq. 5): each block's
  output gradient is estimated as ``<dL/dh_n, u_n> u_n`` per sample ``n``, where ``u_n`` is the
  normalised gradient of the block's head loss. The directional derivatives ``<dL/dh_n, u_n>``
  come from forward-mode AD: one tangent stream per block joins the forward sweep at its block
  and rides along to the loss (``torch.func.jvp`` under ``vmap`` over the streams, primal computed
  once). The estimate is then pulled back through its block only.

BatchNorm in train mode cannot mutate its running statistics inside ``torch.func.jvp``; blocks
are called functionally with buffers cloned inside the transform and the new statistics are
copied back once, so they are updated exactly once per step, as in eager mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

__all__ = ["compute_gradients"]


def _functional(block: nn.Module) -> tuple[Callable, dict[str, Tensor]]:
    """``block`` as a pure function ``h -> (out, new_buffers)`` (buffers cloned inside)."""
    params = dict(block.named_parameters())
    buffers = dict(block.named_buffers())

    def f(h: Tensor):
        fresh = {k: b.clone() for k, b in buffers.items()}
        return functional_call(block, (params, fresh), (h,)), fresh

    return f, buffers


def push(block: nn.Module, h: Tensor, streams: Tensor, *, update_buffers: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``block`` on ``h`` and push the tangent ``streams`` (shape ``(S, *h.shape)``) through it.

    The primal output is computed once and keeps its autograd graph to the block's parameters.
    """
    f, buffers = _functional(block)
    out, tangents, new = vmap(lambda t: jvp(f, (h,), (t,), has_aux=True), out_dims=(None, 0, 0),
                              randomness="same")(streams)
    if update_buffers:
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(new[k][0])
    return out, tangents


def _unit(g: Tensor) -> Tensor:
    """Each sample's slice of ``g`` divided by its norm (zero stays zero)."""
    norms = g.flatten(1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    return g / norms.view(-1, *([1] * (g.dim() - 1)))


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a[..., n, :], b[n, :]>`` over the trailing dims: ``(..., B, *f) x (B, *f) -> (..., B)``."""
    return (a * b).flatten(a.dim() - b.dim() + 1).sum(-1)


def _exact_directional(blocks, h: Tensor, u: Tensor, grad_out: Tensor, chunk: int) -> Tensor:
    """``<dL/dh_n, u_n>`` for every sample n, one tangent stream per sample (chunked)."""
    batch = h.shape[0]
    eye = torch.eye(batch, dtype=u.dtype, device=u.device).view(batch, batch, *([1] * (u.dim() - 1)))
    result = []
    for start in range(0, batch, chunk):
        streams = eye[start : start + chunk] * u  # stream n carries u_n at sample n, zero elsewhere
        out = h
        with torch.no_grad():
            for block in blocks:
                out, streams = push(block, out, streams, update_buffers=False)
        result.append(_per_sample_dot(streams, grad_out).sum(-1))
    return torch.cat(result)


def compute_gradients(model, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Fill ``p.grad`` for every parameter that ``model.method`` trains; return detached metrics.

    ``model`` is a :class:`fwdtrans.Converted`. Gradients are written fresh (old ones are cleared).
    """
    for p in model.parameters():
        p.grad = None
    kind = model.method.kind
    blocks, heads = list(model.blocks), list(model.heads)
    metrics: dict[str, Tensor] = {}

    if kind == "backprop":
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
    else:
        exact = model.method.per_sample == "exact"
        outs: list[Tensor] = []
        guesses: list[Tensor] = []
        local_losses: list[Tensor] = []
        streams = None
        h = x
        for j, block in enumerate(blocks):
            if streams is None:
                out = block(h)
            else:
                out, streams = push(block, h, streams)
            outs.append(out)
            if j == len(blocks) - 1:
                break
            if kind == "local":
                local_losses.append(F.cross_entropy(heads[j](out), y))
            else:
                leaf = out.detach().requires_grad_()
                head_loss = F.cross_entropy(heads[j](leaf), y)
                head_loss.backward()  # the head's own gradient, and the guess in leaf.grad
                local_losses.append(head_loss)
                u = _unit(leaf.grad)
                guesses.append(u)
                if not exact:
                    streams = u[None] if streams is None else torch.cat([streams, u[None]])
            h = out.detach()
        logits = outs[-1]
        loss = F.cross_entropy(logits, y)
        if kind == "local":
            torch.autograd.backward([loss, *local_losses])
        else:
            (grad_logits,) = torch.autograd.grad(loss, logits, retain_graph=True)
            if not guesses:
                d = []
            elif exact:
                d = torch.stack([
                    _exact_directional(blocks[j + 1 :], outs[j].detach(), u, grad_logits, model.exact_chunk)
                    for j, u in enumerate(guesses)
                ])
            else:
                d = _per_sample_dot(streams, grad_logits)  # (blocks - 1, batch)
            pulled = [(out, dj.view(-1, *([1] * (u.dim() - 1))) * u)
                      for out, dj, u in zip(outs, d, guesses) if out.requires_grad]  # skip parameter-free blocks
            torch.autograd.backward([loss, *(o for o, _ in pulled)], [None, *(c for _, c in pulled)])
        for j, head_loss in enumerate(local_losses):
            metrics[f"loss/head{j}"] = head_loss.detach()

    metrics["loss"] = loss.detach()
    metrics["accuracy"] = (logits.detach().argmax(-1) == y).float().mean()
    return metrics
