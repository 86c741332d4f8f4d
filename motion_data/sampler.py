"""Clip sampling (filled in by the loader issue); the config dataclass lives here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplerConfig:
    """``data.sampler``: clip weight ``max(min_weight, r) ** power`` for ``dynamic_ratio``."""

    method: str = "uniform"  # uniform | dynamic_ratio
    power: float = 1.0
    min_weight: float = 0.05
    mode: str = "exact"  # exact | streaming
