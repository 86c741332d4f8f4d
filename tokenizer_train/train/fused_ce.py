"""The decoder's last linear layer and the per-entry cross-entropy in one pass over chunks of
rows, so that the ``(rows, W*W)`` logits never exist at once (docs/DESIGN.md, Trainer:
"Compute only what the loss sees"). The backward pass recomputes each chunk's logits.

``linear_ce(x, layer, target, offset)`` returns the per-row CE of ``layer(x) + offset``
(0 where ``target`` is ``IGNORE``) and the argmax of ``layer(x)`` (the raw logits, what
accuracy reads). Everything downstream of the per-row CE (class weights, focal loss) is
ordinary autograd on a ``(rows,)`` vector. ``tests/test_masked_decoding.py`` compares it
with ``F.cross_entropy`` on the materialised logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ROWS = 8192  # 8192 x 225 float32 logits: 7 MB a chunk


def _chunks(n: int, size: int):
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, offset, target, chunk):
        with torch.autocast(x.device.type, enabled=False):  # float32 throughout, as backward recomputes it
            return _LinearCE._forward(ctx, x, weight, bias, offset, target, chunk)

    @staticmethod
    def _forward(ctx, x, weight, bias, offset, target, chunk):
        P = x.shape[0]
        ce = torch.zeros(P, dtype=torch.float32, device=x.device)
        pred = torch.zeros(P, dtype=torch.int64, device=x.device)
        w, b = weight.float(), None if bias is None else bias.float()
        for lo, hi in _chunks(P, chunk):
            z = F.linear(x[lo:hi].float(), w, b)
            pred[lo:hi] = z.argmax(-1)
            if offset is not None:
                z = z + offset
            t = target[lo:hi]
            keep = t != IGNORE
            picked = z.gather(1, t.clamp_min(0)[:, None])[:, 0]
            ce[lo:hi] = torch.where(keep, torch.logsumexp(z, -1) - picked, 0.0)
        ctx.save_for_backward(x, weight, bias, offset, target)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(pred)
        return ce, pred

    @staticmethod
    def backward(ctx, g_ce, _g_pred):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _LinearCE._backward(ctx, g_ce)

    @staticmethod
    def _backward(ctx, g_ce):
        x, weight, bias, offset, target = ctx.saved_tensors
        w, b = weight.float(), None if bias is None else bias.float()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        gb = torch.zeros_like(b) if b is not None and ctx.needs_input_grad[2] else None
        g_ce = g_ce.float()
        for lo, hi in _chunks(x.shape[0], ctx.chunk):
            xc = x[lo:hi].float()
            z = F.linear(xc, w, b)
            if offset is not None:
                z = z + offset
            t = target[lo:hi]
            dz = torch.softmax(z, -1)
            dz.scatter_add_(1, t.clamp_min(0)[:, None], torch.full((hi - lo, 1), -1.0, device=dz.device))
            dz *= torch.where(t != IGNORE, g_ce[lo:hi], 0.0)[:, None]
            if gx is not None:
                gx[lo:hi] = (dz @ w).to(x.dtype)
            if gw is not None:
                gw += dz.T @ xc
            if gb is not None:
                gb += dz.sum(0)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gx, gw, gb, None, None, None


def linear_ce(x: torch.Tensor, layer: torch.nn.Linear, target: torch.Tensor, offset: torch.Tensor | None = None,
              chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce (P,) float32, pred (P,) int64)`` of ``layer(x)`` for ``x (P, H)``, ``target (P,)``."""
    off = None if offset is None else offset.to(x.device, torch.float32)
    return _LinearCE.apply(x, layer.weight, layer.bias, off, target, chunk)
