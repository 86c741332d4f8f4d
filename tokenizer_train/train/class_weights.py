"""Class weights of ``training.class_weighting`` (stage 2) and their run artifacts.

The weights need the label distribution under the run's static filter over the training
split only (validation labels must not shape the loss): ``training_class_counts``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from motion_data.common.atomic import atomic_open
from motion_data.common.labels import center_class, ring_map
from motion_data.read.split import split_manifest
from motion_data.common.errors import SettingError
from motion_data.read.clips import class_counts


def training_class_counts(build, data_cfg, progress: bool = False) -> np.ndarray:
    """``(W*W,)`` kept-label counts of the training clips of ``build`` (a ``BuildDir``) under
    ``data_cfg.static_filter``, the split being the loader's (``split_manifest`` at
    ``data_cfg.val_split``)."""
    train_rows, _ = split_manifest(build.manifest(["split_group", "start_frame"]), data_cfg.val_split, build.T)
    return class_counts(build, data_cfg.static_filter, rows=train_rows, progress=progress)


def _normalise_under(weights: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Scale so that the expected weight under the label distribution ``freq`` is 1."""
    mean = float((weights * freq).sum())
    return weights / mean if mean > 0 else weights


def balanced_weights(counts, W: int, power: float = 1.0, min_weight: float = 0.0,
                     max_weight: float = 1e9, center_gamma: float = 1.0) -> np.ndarray:
    """``w_c ∝ 1 / freq_c ** power``, mean 1 under the labels, clipped, centre times ``center_gamma``.

    Classes never seen in ``counts`` get the largest weight of the seen ones (they are the
    rarest; they cannot appear in a batch drawn from that distribution anyway).
    """
    counts = np.asarray(counts, np.float64)
    if counts.shape != (W * W,):
        raise ValueError(f"class counts must have shape ({W * W},), got {counts.shape}")
    total = counts.sum()
    if total <= 0:
        raise SettingError("class counts are all zero: no kept labels to weight by")
    freq = counts / total
    seen = freq > 0
    w = np.zeros_like(freq)
    w[seen] = freq[seen] ** (-float(power))
    w = _normalise_under(w, freq)
    w = np.clip(w, min_weight, max_weight)
    w[~seen] = w[seen].max()
    w[center_class(W)] *= center_gamma
    return w.astype(np.float32)


def ring_decay_weights(counts, W: int, center_gamma: float = 1.0, full_weight_ring: int = 2,
                       min_weight: float = 0.0, max_weight: float = 1e9) -> np.ndarray:
    """Weight by ring: ``center_gamma`` at ring 0 rising linearly to 1 at ``full_weight_ring``.

    The ramp is then normalised to mean 1 under the label distribution (uniform when
    ``counts`` is None) and clipped to [min_weight, max_weight]; clipping keeps it monotonic.
    """
    rings = ring_map(W).astype(np.float64)
    full = max(int(full_weight_ring), 1)
    w = center_gamma + (1.0 - center_gamma) * np.minimum(rings / full, 1.0)
    if counts is None:
        freq = np.full(W * W, 1.0 / (W * W))
    else:
        counts = np.asarray(counts, np.float64)
        if counts.shape != (W * W,):
            raise ValueError(f"class counts must have shape ({W * W},), got {counts.shape}")
        if counts.sum() <= 0:
            raise SettingError("class counts are all zero: no kept labels to weight by")
        freq = counts / counts.sum()
    w = np.clip(_normalise_under(w, freq), min_weight, max_weight)
    return w.astype(np.float32)


def class_weights_for(cw_cfg, counts, W: int) -> np.ndarray | None:
    """The ``(W*W,)`` weights of a ``training.class_weighting`` section (None for ``none``)."""
    if cw_cfg.method == "none":
        return None
    if cw_cfg.method == "balanced":
        if counts is None:
            return None
        return balanced_weights(counts, W, cw_cfg.power, cw_cfg.min_weight, cw_cfg.max_weight, cw_cfg.center_gamma)
    if cw_cfg.method == "ring_decay":
        return ring_decay_weights(counts, W, cw_cfg.center_gamma, cw_cfg.full_weight_ring,
                                  cw_cfg.min_weight, cw_cfg.max_weight)
    raise SettingError(f"unknown class_weighting.method {cw_cfg.method!r}")


def class_weights_image(weights, W: int) -> np.ndarray:
    """``(1, W, W)`` float32 in [0, 1] (weights / max) for ``SummaryWriter.add_image`` (CHW)."""
    w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, np.float32).reshape(W, W)
    top = float(w.max())
    return (w / top if top > 0 else w)[None]


def _atomic_write(path: Path, write):
    with atomic_open(path, "wb") as f:
        write(f)


def save_class_weights(path, weights, W: int, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<path>.npy`` ((W, W) float32, row = dy, col = dx) and ``<path>.json``."""
    path = Path(path)
    if path.suffix in (".npy", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, np.float32).reshape(W, W)
    npy, js = path.with_suffix(".npy"), path.with_suffix(".json")
    _atomic_write(npy, lambda f: np.save(f, w, allow_pickle=False))
    doc = {"W": W, "center_class": center_class(W), "weights": w.tolist(), **(meta or {})}
    _atomic_write(js, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    return npy, js
