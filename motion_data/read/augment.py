"""Track augmentation of training batches (seed stage 4); off by default.

Applied by the loader per batch to the positions ``(B, T, N, 2)`` (reference px) before
velocities and labels are computed, so the labels (the build's rule) always describe the
positions and velocities the model sees. Per clip, with probability ``p``:
- scale: every dynamic (kept) point's track is scaled about its first position,
  ``p'[t] = p[0] + s * (p[t] - p[0])``, by one factor ``s`` per clip drawn log-uniformly
  from ``scale_range`` (no bias in log scale). Points the static filter drops are left
  untouched, and a point that never moves stays still.
- jitter: zero-mean Gaussian noise of ``jitter_std`` normalised units (``jitter_std *
  (W-1)/2`` px) added to frames 1..T-1 of kept points that move (frame 0 stays the
  anchor); static points are never pushed out of the centre class by noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from motion_data.common.labels import DEFAULT_W, half_window


@dataclass
class AugmentConfig:
    """``data.augment``: scale and zero-mean jitter of training velocities; off by default."""

    enabled: bool = False
    scale_range: list = field(default_factory=lambda: [0.8, 1.25])
    jitter_std: float = 0.0
    p: float = 0.5

    def __post_init__(self):
        lo, hi = (float(x) for x in self.scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"augment.scale_range must be 0 < lo <= hi, got {self.scale_range}")
        if self.jitter_std < 0 or not 0 <= self.p <= 1:
            raise ValueError(f"augment.jitter_std must be >= 0 and p in [0, 1], got {self.jitter_std}, {self.p}")


def augment_batch(pos: np.ndarray, keep: np.ndarray, cfg: AugmentConfig,
                  rng: np.random.Generator, W: int = DEFAULT_W) -> np.ndarray:
    """Augmented copy of positions ``pos`` ``(B, T, N, 2)``; keep ``(B, N)``
    bool; ``W`` converts ``jitter_std`` to pixels."""
    if not cfg.enabled:
        return pos
    B = pos.shape[0]
    lo, hi = (float(x) for x in cfg.scale_range)
    applied = rng.random(B) < cfg.p
    scale = np.where(applied, np.exp(rng.uniform(math.log(lo), math.log(hi), B)), 1.0).astype(np.float32)
    p0 = pos[:, :1]
    dyn = keep[:, None, :, None]
    out = np.where(dyn, p0 + scale[:, None, None, None] * (pos - p0), pos)
    if cfg.jitter_std > 0:
        moves = (pos != p0).any(axis=(1, 3)) & keep & applied[:, None]  # (B, N)
        noise = rng.standard_normal(pos.shape, dtype=np.float32) * np.float32(cfg.jitter_std * half_window(W))
        noise[:, 0] = 0.0
        out = out + noise * moves[:, None, :, None]
    return out.astype(np.float32, copy=False)
