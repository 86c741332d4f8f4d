"""The one definition of units, labels and rings (docs/DESIGN.md "Units and labels").

Positions are pixels of a ``ref_size x ref_size`` frame, (x, y) order; velocities are their
per-step differences. Labels follow one of ``LABEL_RULES`` (the build records which):
``amplify`` (default, AMPLIFY's ``get_autoregressive_indices_efficient``) rounds the clamped
positions and takes the difference, ``velocity`` rounds the difference. Every module that
needs a label, a normalised velocity or a ring calls these functions (numpy and torch); the
numba kernels of ``stats`` and ``loader`` are checked against them in the tests.
"""
from __future__ import annotations

import numpy as np

DEFAULT_W = 15
DEFAULT_REF_SIZE = 128
DEFAULT_T = 16
DEFAULT_GRID = 20
LABEL_RULES = ("amplify", "velocity")
DEFAULT_LABEL_RULE = "amplify"


def rule_code(rule: str) -> int:
    """The rule as the integer the numba kernels take (its index in ``LABEL_RULES``)."""
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule must be one of {', '.join(LABEL_RULES)}, got {rule!r}")
    return LABEL_RULES.index(rule)


def half_window(W: int = DEFAULT_W) -> float:
    """Pixels that map to a normalised velocity of 1."""
    return (W - 1) / 2.0


def center_class(W: int = DEFAULT_W) -> int:
    return (W // 2) * W + W // 2


def normalize(v_px, W: int = DEFAULT_W):
    """``clip(v_px / ((W-1)/2), -1, 1)``; works on numpy arrays and torch tensors."""
    scaled = v_px / half_window(W)
    if isinstance(scaled, np.ndarray):
        return np.clip(scaled, -1.0, 1.0).astype(np.float32, copy=False)
    return scaled.clamp(-1.0, 1.0)


def denormalize(v_norm, W: int = DEFAULT_W):
    return v_norm * half_window(W)


def labels_from_px(v_px, W: int = DEFAULT_W):
    """Class id ``row * W + col`` of each displacement; ``v_px[..., 0]`` is x (the column).

    numpy rounds half to even, as does torch; both libraries agree on every input.
    """
    c = W // 2
    if isinstance(v_px, np.ndarray):
        col = np.clip(np.rint(v_px[..., 0]) + c, 0, W - 1).astype(np.int64)
        row = np.clip(np.rint(v_px[..., 1]) + c, 0, W - 1).astype(np.int64)
        return row * W + col
    import torch

    col = torch.clamp(torch.round(v_px[..., 0]) + c, 0, W - 1).long()
    row = torch.clamp(torch.round(v_px[..., 1]) + c, 0, W - 1).long()
    return row * W + col


def quantize_positions(pos, ref_size: int = DEFAULT_REF_SIZE):
    """AMPLIFY's ``round(clip(p, 0, ref_size - 1))`` per coordinate (half to even)."""
    if isinstance(pos, np.ndarray):
        return np.rint(np.clip(pos, 0, ref_size - 1))
    import torch

    return torch.round(torch.clamp(pos, 0, ref_size - 1))


def velocities(pos):
    """``p[t+1] - p[t]`` over the time axis (-3) of ``(..., T, N, 2)`` positions."""
    return pos[..., 1:, :, :] - pos[..., :-1, :, :]


def step_valid(vis):
    """``vis[t] & vis[t+1]`` over the time axis (-2) of ``(..., T, N)`` visibility."""
    return vis[..., 1:, :] & vis[..., :-1, :]


def labels_from_positions(pos, W: int = DEFAULT_W, ref_size: int = DEFAULT_REF_SIZE,
                          rule: str = DEFAULT_LABEL_RULE):
    """Labels ``(..., T-1, N)`` of positions ``(..., T, N, 2)`` (reference px) under ``rule``
    (numpy or torch): ``amplify`` = ``labels_from_px(diff(quantize_positions(p)))``,
    ``velocity`` = ``labels_from_px(diff(p))``."""
    if rule_code(rule) == 0:
        pos = quantize_positions(pos, ref_size)
    return labels_from_px(velocities(pos), W)


def labels_from_norm(v_norm, W: int = DEFAULT_W):
    """Velocity-rule labels of normalised velocities."""
    return labels_from_px(denormalize(v_norm, W), W)


def class_offsets(W: int = DEFAULT_W) -> np.ndarray:
    """``(W*W, 2)`` float32 (dx, dy) pixel displacement at the centre of each class."""
    c = W // 2
    rows, cols = np.divmod(np.arange(W * W), W)
    return np.stack([cols - c, rows - c], axis=1).astype(np.float32)


def ring_map(W: int = DEFAULT_W) -> np.ndarray:
    """``(W*W,)`` int64 Chebyshev distance of each class from the centre class."""
    off = class_offsets(W)
    return np.max(np.abs(off), axis=1).astype(np.int64)


def perplexity_ratio(class_counts: np.ndarray) -> float:
    """``exp(entropy in nats of the label distribution) / n_classes``; 0 for no labels."""
    counts = np.asarray(class_counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()) / counts.size)


def center_prop(class_counts: np.ndarray, W: int = DEFAULT_W) -> float:
    counts = np.asarray(class_counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[center_class(W)] / total) if total > 0 else 0.0
