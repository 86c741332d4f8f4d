"""Code information and cross-entropy in bits per label (docs/DESIGN.md, Trainer: "Quality beyond
the seed's accuracy"), as ``(sum, count)`` pairs so that batches, epochs and DDP ranks
aggregate exactly before dividing.

Code information estimates the mutual information between a clip's codes and its labels:
clip i is decoded with its own codes and with the codes of ``M`` other clips of the batch
(the next ``M`` in rolled order, all others when ``B <= M``), and
``CE(mixture) - CE(own)`` is taken over the evaluation mask, the mixture being the average
of the ``M + 1`` predicted distributions, own included. It never exceeds ``log2(M + 1)``
(the mixture holds the own distribution with weight ``1/(M+1)``), a decoder that ignores its codes scores 0, and a confidently wrong decoder
cannot inflate it (its mixture is as wrong as its own prediction).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

M_OTHERS = 8  # docs/DESIGN.md: M = 8 other clips of the batch
LN2 = math.log(2.0)


def _label_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, S, N)`` natural log-probability of each label under ``logits (B, S, N, K)``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.long()[..., None])[..., 0]


def ce_bits_counts(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum, count) of the cross-entropy in bits per label over the mask."""
    m = mask.bool()
    return float(-_label_logp(logits, labels)[m].sum()) / LN2, int(m.sum())


def others(B: int, m: int = M_OTHERS) -> list[int]:
    """The roll shifts whose codes each clip is also decoded with: 1..min(m, B-1) (clip i
    takes clip ``(i + k) % B``'s codes); no shift for a single clip."""
    return list(range(1, min(m, B - 1) + 1))


@torch.no_grad()
def code_info_counts(decode: Callable[[torch.Tensor], torch.Tensor], quantized: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor, m: int = M_OTHERS, own_logits: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum, count) of ``CE(mixture) - CE(own)`` in bits over the mask.

    ``decode(q)`` maps quantised codes ``(B, L, d)`` (rows permuted) to logits
    ``(B, S, N, K)`` for the clips in their original order (so it keeps each clip's own
    start positions, docs/DESIGN.md / model.decode); ``own_logits`` saves one decode when the
    caller already has them. A batch of one clip has no other codes: ``(0.0, 0)``.
    """
    B = quantized.shape[0]
    shifts = others(B, m)
    msk = mask.bool()
    if not shifts or not msk.any():
        return 0.0, 0
    own = _label_logp(own_logits if own_logits is not None else decode(quantized), labels)
    acc = own.clone()  # running logsumexp of the label's log-probability over the mixture
    for k in shifts:
        other = _label_logp(decode(torch.roll(quantized, shifts=-k, dims=0)), labels)
        acc = torch.logaddexp(acc, other)
    mix = acc - math.log(len(shifts) + 1)
    return float((own - mix)[msk].sum()) / LN2, int(msk.sum())


def max_bits(B: int, m: int = M_OTHERS) -> float:
    """The ceiling ``log2(M' + 1)`` of a batch of ``B`` clips (``M' = min(m, B - 1)``)."""
    return math.log2(len(others(B, m)) + 1)
