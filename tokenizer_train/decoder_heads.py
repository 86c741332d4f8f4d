"""Per-point output heads of the decoder other than the default additive one (``model.decoder``).

- ``code_query``: a point's term acts only through the code features. Each (step, point)
  query (a point query plus a step query) attends to the code features of the tokens up to
  its step and reads a weighted average of values computed from the codes alone. The
  weights sum to 1, so identical codes give identical values for every point: a decoder that
  ignores its codes cannot predict a per-point prior (issue 12: the free ``head_point``
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
        a = self.mlp_step(h)[:, :, group]  # per token, then spread over its points
        x = h[:, :, group] + self.mlp_out(F.relu(a + self.mlp_point(point)[:, None]))
        return self.proj(x)
