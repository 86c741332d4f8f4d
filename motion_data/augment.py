"""Velocity augmentation of training batches (seed stage 4); off by default.

Applied by the loader per batch, in normalised velocity space, before labels are computed,
so the labels always describe the velocities the model sees. Per clip, with probability
``p``:
- scale: every dynamic (kept) point's velocity is multiplied by one factor drawn
  log-uniformly from ``scale_range`` (so a symmetric range such as [0.8, 1.25] has no bias
  in log scale). Points the static filter drops are left untouched, so a static point
  stays in the centre class; a zero velocity stays zero.
- jitter: zero-mean Gaussian noise of ``jitter_std`` (normalised units) added to each valid
  step of kept points with non-zero velocity; static points are never pushed out of the
  centre class by noise.
Results are clipped to [-1, 1] like ``labels.normalize``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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


def augment_batch(v_norm: np.ndarray, keep: np.ndarray, valid: np.ndarray, cfg: AugmentConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """Augmented copy of ``v_norm`` ``(B, S, N, 2)``; keep ``(B, N)``, valid ``(B, S, N)`` bool."""
    if not cfg.enabled:
        return v_norm
    B = v_norm.shape[0]
    lo, hi = (float(x) for x in cfg.scale_range)
    applied = rng.random(B) < cfg.p
    scale = np.where(applied, np.exp(rng.uniform(math.log(lo), math.log(hi), B)), 1.0).astype(np.float32)
    dyn = keep[:, None, :, None]
    out = np.where(dyn, v_norm * scale[:, None, None, None], v_norm)
    if cfg.jitter_std > 0:
        moving = (v_norm != 0).any(-1) & valid & keep[:, None, :] & applied[:, None, None]
        noise = rng.standard_normal(v_norm.shape, dtype=np.float32) * np.float32(cfg.jitter_std)
        out = out + noise * moving[..., None]
    return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)
