"""Velocity augmentation (filled in by the loader issue); the config dataclass lives here."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AugmentConfig:
    """``data.augment``: scale and zero-mean jitter of training velocities; off by default."""

    enabled: bool = False
    scale_range: list = field(default_factory=lambda: [0.8, 1.25])
    jitter_std: float = 0.0
    p: float = 0.5
