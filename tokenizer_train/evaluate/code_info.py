"""Code information and cross-entropy in bits per label (docs/DESIGN.md, Trainer: "Quality beyond
the original plan's accuracy"), as ``(sum, count)`` pairs so that batches, epochs and DDP ranks
aggregate exactly before dividing.

Code information estimates the mutual information between a clip's codes and its labels:
clip i is decoded with its own codes and with the codes of ``M`` other clips from other split
groups (other rollouts), chosen by ``other_clips`` from a fixed permutation whose seed the run
records, so the figure depends neither on batch size nor on the order of validation, and

``CE(mixture) - CE(own)`` is taken over the evaluation mask, the mixture being the average
of the ``M + 1`` predicted distributions, own included. It never exceeds ``log2(M + 1)``
(the mixture holds the own distribution with weight ``1/(M+1)``), a decoder that ignores its codes scores 0, and a confidently wrong decoder
cannot inflate it (its mixture is as wrong as its own prediction).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

M_OTHERS = 8  # docs/DESIGN.md: M = 8 other clips, from other split groups
CODE_INFO_SEED = 0  # the permutation other_clips draws: fixed, so every run and seed pairs the same clips
LN2 = math.log(2.0)


def _label_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, S, N)`` natural log-probability of each label under ``logits (B, S, N, K)``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.long()[..., None])[..., 0]


def ce_bits_counts(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum, count) of the cross-entropy in bits per label over the mask."""
    m = mask.bool()
    return float(-_label_logp(logits, labels)[m].sum()) / LN2, int(m.sum())


def other_clips(groups, m: int = M_OTHERS, seed: int = 0, starts=None, frames: int = 0,
                max_scan: int = 4096) -> np.ndarray:
    """``(C, m)`` int64: for each of ``C`` clips, the ``m`` clips whose codes it is also
    decoded with: the clips that follow it in one fixed random order (``default_rng(seed)``'s
    permutation of ``0..C-1``), taken cyclically, that share no frame with it: clips of
    another split group (another rollout), or, with ``starts``, windows of its own group at
    least ``frames`` apart (a split of a single video has no other group). -1 where fewer
    than ``m`` such clips lie within the next ``max_scan`` of the order. Depends only on the
    clips and the seed, never on batches or the order in which the clips were read."""
    g = np.unique(np.asarray(groups, dtype=object), return_inverse=True)[1].reshape(-1)
    C = len(g)
    out = np.full((C, m), -1, np.int64)
    if C < 2 or m == 0:
        return out
    st = None if starts is None else np.asarray(starts, np.int64)
    order = np.random.default_rng(seed).permutation(C)
    rank = np.empty(C, np.int64)
    rank[order] = np.arange(C)
    limit = min(C - 1, max_scan)
    K = min(limit, 2 * m)
    while True:
        cand = order[(rank[:, None] + np.arange(1, K + 1)) % C]  # (C, K) the next K clips in the order
        ok = g[cand] != g[:, None]
        if st is not None:
            ok |= np.abs(st[cand] - st[:, None]) >= frames
        if K >= limit or (ok.sum(1) >= m).all():
            break
        K = min(limit, 2 * K)
    pos = np.cumsum(ok, axis=1) - 1  # the j-th acceptable candidate goes to column j
    take = ok & (pos < m)
    rows = np.nonzero(take)
    out[rows[0], pos[take]] = cand[take]
    return out


@torch.no_grad()
def code_info_counts(decode: Callable[[torch.Tensor], torch.Tensor], quantized: torch.Tensor, pool: torch.Tensor,
                     others: np.ndarray, labels: torch.Tensor, mask: torch.Tensor,
                     entry_clip: torch.Tensor | None = None, own_logits: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum, count) of ``CE(mixture) - CE(own)`` in bits over the mask.

    ``quantized (B, L, d)``: the batch's own codes; ``pool (C, L, d)``: codes of the clips
    ``others (B, m)`` (rows of ``pool``, -1 for none; ``other_clips``) point to. ``decode(q)``
    maps codes ``(B, L, d)`` (row b: the codes clip b is decoded with, at its own start
    positions, docs/DESIGN.md / model.decode) to logits ``(P, K)`` of the decoded entries;
    ``labels``, ``mask`` and ``entry_clip`` (each entry's clip, 0..B-1) are ``(P,)``.
    ``own_logits`` saves one decode when the caller has them. Clips without another clip
    count nowhere. Without ``entry_clip``, ``labels`` and ``mask`` are ``(B, S, N)`` and
    ``decode`` gives ``(B, S, N, K)``: every entry.
    """
    if entry_clip is None:
        B = labels.shape[0]
        entry_clip = torch.arange(B, device=labels.device).repeat_interleave(labels[0].numel())
        labels, mask, full = labels.reshape(-1), mask.reshape(-1), decode

        def decode(q):
            z = full(q)
            return z.reshape(-1, z.shape[-1])
        own_logits = None if own_logits is None else own_logits.reshape(-1, own_logits.shape[-1])
    others = np.asarray(others, np.int64)
    n_mix = torch.as_tensor(1 + (others >= 0).sum(1), device=labels.device)[entry_clip]  # (P,)
    msk = mask.bool() & (n_mix > 1)
    if not (others >= 0).any():
        return 0.0, 0
    own = _label_logp(own_logits if own_logits is not None else decode(quantized), labels)
    acc = own.clone()  # running logsumexp of the label's log-probability over the mixture
    for k in range(others.shape[1]):
        col = others[:, k]
        if (col < 0).all():
            continue
        idx = torch.as_tensor(np.maximum(col, 0), device=pool.device)
        other = _label_logp(decode(pool[idx]), labels)
        has = torch.as_tensor(col >= 0, device=labels.device)[entry_clip]
        acc = torch.logaddexp(acc, torch.where(has, other, -torch.inf))
    mix = acc - torch.log(n_mix.double()).float()
    return float((own - mix)[msk].sum()) / LN2, int(msk.sum())


def max_bits(m: int = M_OTHERS) -> float:
    """The ceiling ``log2(m + 1)`` of code information with ``m`` other clips."""
    return math.log2(m + 1)
