"""The static-point filter: which points of a clip the loss sees (docs/DESIGN.md, Units and labels)."""
from __future__ import annotations

from dataclasses import dataclass

# per-point statistics a filter can score points by (build/stats.py computes them)
METRICS = ("mean", "p95", "max")


@dataclass
class StaticFilter:
    """``data.static_filter`` in the YAML; the default is p95@0.04, min_keep 16."""

    enable: bool = False
    metric: str = "p95"
    threshold: float = 0.04
    min_keep: int = 16

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"static_filter.metric must be one of {METRICS}, got {self.metric!r}")
        if self.min_keep < 0:
            raise ValueError(f"static_filter.min_keep must be >= 0, got {self.min_keep}")

    @classmethod
    def parse(cls, spec: str, min_keep: int = 16) -> "StaticFilter":
        """``"p95@0.04"`` -> StaticFilter(enable=True, metric="p95", threshold=0.04)."""
        try:
            metric, thr = spec.split("@")
            return cls(enable=True, metric=metric.strip(), threshold=float(thr), min_keep=min_keep)
        except ValueError as e:
            raise ValueError(f"filter spec {spec!r} must look like 'p95@0.04' ({e})") from None

    def __str__(self):
        return f"{self.metric}@{self.threshold:g},min_keep={self.min_keep}" if self.enable else "off"


# the default filter: a build's default and the evaluation mask of a store without
# a recorded build_filter (DESIGN.md, Units and labels)
DEFAULT_FILTER = StaticFilter(True, "p95", 0.04, 16)


def recorded_filter(attrs: dict) -> StaticFilter:
    """The build's recorded filter (store attribute ``build_filter``), enabled; the default
    when the store has none. It defines the evaluation mask (DESIGN.md, Trainer)."""
    bf = attrs.get("build_filter")
    if not bf:
        return DEFAULT_FILTER
    return StaticFilter(True, str(bf["metric"]), float(bf["threshold"]), int(bf["min_keep"]))
