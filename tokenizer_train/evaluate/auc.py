"""AUC of "moves" (label != centre) against "static" from the score ``1 - p(centre)``
(docs/DESIGN.md, Trainer), in a mergeable form: per-class histograms of the score's log-odds
``log((1 - p_c) / p_c) = logsumexp(other logits) - centre logit`` in fine bins. The
log-odds is a monotone map of the score (same AUC) that keeps a collapsed model's scores,
all within a hair of 0, in distinct bins. Histograms of batches, epochs and ranks add;
the AUC of a histogram is exact up to pairs that share a bin (counted as ties).
"""
from __future__ import annotations

import numpy as np
import torch

LO, HI, NBINS = -32.0, 32.0, 12800  # bin width 0.005 in log-odds (0.5% in odds)


def log_odds_moving(logits: torch.Tensor, center: int) -> torch.Tensor:
    """``log((1 - p(centre)) / p(centre))`` of each prediction, computed from the logits."""
    z = logits.float()
    rest = torch.cat([z[..., :center], z[..., center + 1:]], dim=-1)
    return torch.logsumexp(rest, dim=-1) - z[..., center]


def _bin(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(LO, HI) - LO) * (NBINS / (HI - LO))).long().clamp_(0, NBINS - 1)


def auc_hist(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, center: int) -> np.ndarray:
    """``(2, NBINS)`` int64 counts of the score's bin: row 0 static (centre), row 1 moving."""
    m = mask.bool()
    b = _bin(log_odds_moving(logits[m], center))
    moving = labels[m] != center
    out = np.zeros((2, NBINS), np.int64)
    out[0] = torch.bincount(b[~moving], minlength=NBINS).cpu().numpy()
    out[1] = torch.bincount(b[moving], minlength=NBINS).cpu().numpy()
    return out


def auc_from_hist(hist: np.ndarray) -> float:
    """P(score of a moving label > score of a static one) + 0.5 P(same bin); nan when a
    class is empty."""
    neg, pos = np.asarray(hist[0], np.float64), np.asarray(hist[1], np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # static labels in strictly lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

