"""FSQ's geometry (vector-quantize-pytorch ``FSQ``): the level grid each channel rounds to,
and the bounded value before rounding. Used by the model (its ``z_bounded`` output) and by
the code-usage regulariser."""
from __future__ import annotations

import torch


def fsq_levels_grid(levels) -> list[torch.Tensor]:
    """Per channel, the integer values FSQ's rounding picks from: ``arange(L) - L // 2``.

    FSQ.bound maps a channel to ``tanh(z + shift) * (L-1)(1+eps)/2 - offset`` (offset 0.5
    for even L) and rounds it, so odd L gives -(L-1)/2..(L-1)/2 and even L gives
    -L/2..L/2-1 (e.g. 8 -> -4..3); the code is that integer / (L // 2).
    """
    return [torch.arange(int(L), dtype=torch.float32) - int(L) // 2 for L in levels]


def fsq_prerounding(z, levels, eps: float = 1e-3, hard_clamp: bool = False):
    """FSQ.bound without the rounding: ``(..., d)`` values on the integer level grid.

    ``round(fsq_prerounding(z)) / (L // 2)`` equals ``FSQ.quantize(z)`` (a test checks it
    against the installed vector-quantize-pytorch).
    """
    L = torch.as_tensor(list(levels), dtype=torch.float32, device=z.device)
    z = z.float()
    half_l = (L - 1) * (1 + eps) / 2
    offset = torch.where(L.remainder(2) == 0, 0.5, 0.0)
    if hard_clamp:
        return z.clamp(-1.0, 1.0) * half_l - offset
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z + shift) * half_l - offset


def fsq_prerounding_from_module(fsq, z):
    """Bounded pre-rounding values of an ``FSQ`` module for its input ``z`` (..., fsq.dim)."""
    if fsq.preserve_symmetry or fsq.num_codebooks != 1 or fsq.orthogonal_rotation:
        raise ValueError("code_usage_loss supports FSQ without preserve_symmetry, orthogonal_rotation "
                         "or several codebooks")
    levels = fsq._levels.tolist()
    return fsq_prerounding(fsq.project_in(z), levels, hard_clamp=fsq.bound_hard_clamp)
