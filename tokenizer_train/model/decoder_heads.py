"""Per-point output heads of the decoder (``model.decoder``).

- ``additive`` (the default): the step feature of a point's group plus a per-point feature,
  through a GELU (``additive_features``).
- ``code_query``: a point's term acts only through the code features. Each (step, point)
  query (a point query plus a step query) attends to the code features of the tokens up to
  its step and reads a weighted average of values computed from the codes alone. The
  weights sum to 1, so identical codes give identical values for every point: a decoder that
  ignores its codes cannot predict a per-point prior (the free ``head_point``
  path of the additive head is what let the codes go unused).
- ``amplify``: AMPLIFY's reference head (pairlab/AMPLIFY ``VAEDecoder``): the step feature of
  a non-causal zero-query decoder plus a residual MLP of (step feature, point embedding),
  then a linear map to the W*W classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer_train.model.gather import gather_rows, point_rows


class CodeQueryHead(nn.Module):
    """One-head attention of (step, point) queries over code features: ``(B, S, N, H)``."""

    def __init__(self, dim: int, out_dim: int, max_steps: int):
        super().__init__()
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, out_dim)
        self.step_query = nn.Embedding(max_steps, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, code_feat, point_query, steps: int, step_of_token):
        """``code_feat (B, L, D)`` from the codes alone, ``point_query (B or 1, N, D)``,
        ``step_of_token (L,)``: a query of step s sees the tokens of steps <= s (causal)."""
        B = code_feat.shape[0]
        k, v = self.key(code_feat), self.value(code_feat)
        qs = self.step_query(torch.arange(steps, device=code_feat.device))
        by_point = torch.einsum("bnd,bld->bnl", point_query.expand(B, -1, -1), k)
        by_step = torch.einsum("sd,bld->bsl", qs, k)
        scores = (by_step[:, :, None, :] + by_point[:, None]) * self.scale  # (B, S, N, L)
        seen = step_of_token[None, :] <= torch.arange(steps, device=code_feat.device)[:, None]  # (S, L)
        scores = scores.masked_fill(~seen[None, :, None, :], float("-inf"))
        return torch.einsum("bsnl,blh->bsnh", torch.softmax(scores, dim=-1), v)

    def select(self, code_feat, point_query, steps: int, step_of_token, b, s, n):
        """``forward`` at the entries ``(b, s, n)`` only: ``(P, H)``. The scores are gathered from
        the same per-step and per-point products as ``forward``'s; the weighted sum of values
        runs row by row (``_RowsMix``), never building a ``(P, L, H)`` gather."""
        B = code_feat.shape[0]
        k, v = self.key(code_feat), self.value(code_feat)
        qs = self.step_query(torch.arange(steps, device=code_feat.device))
        by_point = torch.einsum("bnd,bld->bnl", point_query.expand(B, -1, -1), k)
        by_step = torch.einsum("sd,bld->bsl", qs, k)
        scores = (gather_rows(by_step, b, s) + gather_rows(by_point, b, n)) * self.scale  # (P, L)
        scores = scores.masked_fill(step_of_token[None, :] > s[:, None], float("-inf"))
        return _RowsMix.apply(torch.softmax(scores, dim=-1), v, b)

    def features(self, a, code_feat, point_query, step_of_token, sel=None):
        """What the decoder's last layer reads: ``(B, S, N, H)``, or ``(P, H)`` at the entries
        ``sel = (b, s, n)``. ``a (B, S, G, H)``: the step features of the G tokens of a step,
        averaged into one feature for all points (no per-group prior either): what differs
        between points comes only through the codes."""
        a = a if a.shape[2] == 1 else a.mean(2, keepdim=True)  # (B, S, 1, H)
        S = a.shape[1]
        if sel is None:
            return F.gelu(a + self(code_feat, point_query, S, step_of_token))
        b, s, n = sel
        return F.gelu(gather_rows(a[:, :, 0], b, s) + self.select(code_feat, point_query, S, step_of_token, b, s, n))


def additive_features(a, p, group, sel=None):
    """The default head before its last layer: ``gelu(step feature of the point's group +
    point feature)``. ``a (B, S, G, H)``, ``p (B or 1, N, H)``, ``group (N,)`` -> ``(B, S, N, H)``,
    or ``(P, H)`` at the entries ``sel = (b, s, n)``."""
    if sel is None:
        return F.gelu((a if a.shape[2] == 1 else a[:, :, group]) + p[:, None])
    b, s, n = sel
    return F.gelu(gather_rows(a, b, s, group[n]) + point_rows(p, b, n))


class _RowsMix(torch.autograd.Function):
    """``out[p] = sum_l w[p, l] * v[b[p], l]`` for ``w (P, L)``, ``v (B, L, H)``: one ``(P, H)``
    product per token, so memory stays ``O(P * H)`` forward and backward (a batched matmul
    over a ``v[b]`` gather would hold ``(P, L, H)``)."""

    @staticmethod
    def forward(ctx, w, v, b):
        out = torch.zeros(w.shape[0], v.shape[2], dtype=torch.promote_types(w.dtype, v.dtype), device=w.device)
        for j in range(w.shape[1]):
            out += w[:, j, None] * v[:, j].index_select(0, b)
        ctx.save_for_backward(w, v, b)
        return out

    @staticmethod
    def backward(ctx, g):
        w, v, b = ctx.saved_tensors
        gw = torch.empty_like(w) if ctx.needs_input_grad[0] else None
        # summed in float32: each row of v gathers about P / B contributions
        gv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if ctx.needs_input_grad[1] else None
        for j in range(w.shape[1]):
            if gw is not None:
                gw[:, j] = (g * v[:, j].index_select(0, b)).sum(-1).to(w.dtype)
            if gv is not None:
                gv[:, j].index_add_(0, b, (w[:, j, None] * g).float())
        return gw, None if gv is None else gv.to(v.dtype), None


class AmplifyHead(nn.Module):
    """``h (B, S, G, D)`` token features, ``point (B or 1, N, D)``, ``group (N,)`` -> logits ``(B, S, N, C)``."""

    def __init__(self, dim: int, mlp_dim: int, num_classes: int):
        super().__init__()
        # the MLP's first layer on [step feature, point embedding], split so that no
        # (B, S, N, 2D) concatenation is built
        self.mlp_step = nn.Linear(dim, mlp_dim)
        self.mlp_point = nn.Linear(dim, mlp_dim, bias=False)
        self.mlp_out = nn.Linear(mlp_dim, dim)
        self.proj = nn.Linear(dim, num_classes)

    def forward(self, h, point, group):
        return self.proj(self.features(h, point, group))

    def features(self, h, point, group, sel=None):
        """What ``proj`` reads: ``(B, S, N, D)``, or ``(P, D)`` at the entries ``sel = (b, s, n)``."""
        a = self.mlp_step(h)  # per token, then spread over its points
        p = self.mlp_point(point)  # (B or 1, N, mlp)
        if sel is None:
            return h[:, :, group] + self.mlp_out(F.relu(a[:, :, group] + p[:, None]))
        b, s, n = sel
        g = group[n]
        return gather_rows(h, b, s, g) + self.mlp_out(F.relu(gather_rows(a, b, s, g) + point_rows(p, b, n)))
