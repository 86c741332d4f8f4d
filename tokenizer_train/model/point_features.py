"""Per-point features of the tokenizer: start-position encoding, point groups, shared point encoder.

Positions are in pixels of the ref_size x ref_size reference frame (docs/DESIGN.md "Units"), so
``start_pos / DEFAULT_REF_SIZE`` lies in [0, 1) for a point inside the frame.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from motion_data.common.labels import DEFAULT_REF_SIZE
from motion_data.common.errors import SettingError


def fourier_features(start_pos: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """``(B, N, 2)`` reference px -> ``(B, N, 4 * num_freqs)``: sin and cos of 2π 2^k p / ref_size."""
    if start_pos.ndim != 3 or start_pos.shape[-1] != 2:
        raise ValueError(f"start_pos must be (B, N, 2) reference px, got {tuple(start_pos.shape)}")
    freqs = 2.0 ** torch.arange(num_freqs, device=start_pos.device, dtype=torch.float32)
    x = start_pos.float()[..., None] / DEFAULT_REF_SIZE * (2 * math.pi) * freqs  # (B, N, 2, F)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)


def start_features(start_pos: torch.Tensor | None, pos_enc, B: int, N: int) -> torch.Tensor | None:
    """Fourier features ``(B, N, 4F)`` of the start positions for ``model.point_pos_enc``
    (``pos_enc``), or None when it is off."""
    if not pos_enc.enabled:
        return None
    if start_pos is None:
        raise ValueError("model.point_pos_enc.enabled needs start_pos (B, N, 2) reference px: pass "
                         "batch['positions'][:, 0], or set model.point_pos_enc.enabled=false")
    if tuple(start_pos.shape) != (B, N, 2):
        raise ValueError(f"start_pos must be ({B}, {N}, 2), got {tuple(start_pos.shape)}")
    return fourier_features(start_pos, pos_enc.num_freqs)


def group_of_points(num_points: int, groups: int) -> torch.Tensor:
    """``(N,)`` group of each point: contiguous index blocks (rows of a row-major grid)."""
    if num_points % groups:
        raise SettingError(f"model.groups={groups} must divide the number of points {num_points}")
    return torch.arange(num_points) // (num_points // groups)


def motion_position_features(velocities: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``v (B, S, N, 2)``, ``phi (B, N, F)`` -> ``(B, S, N, 2F)``: each velocity times its point's features.

    Positions enter the encoder only through motion, so zero motion maps to one code whatever
    the positions (``zero_codes`` needs none).
    """
    return (velocities.float()[..., :, None] * phi[:, None, :, None, :].float()).flatten(-2)


class PointEncoder(nn.Module):
    """``model.point_encoder``: one MLP applied to every point's step input ``(..., in_dim) -> (..., dim)``."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
