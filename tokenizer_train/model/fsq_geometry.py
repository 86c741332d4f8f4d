"""FSQ's geometry (vector-quantize-pytorch ``FSQ``): the level grid each channel rounds to,
and the bounded value before rounding. Used by the model (``quantise``: its ``z_bounded``
output) and by the code-usage regulariser."""
from __future__ import annotations

import functools

import torch


def levels_grid_on(levels, device) -> list[torch.Tensor]:
    """:func:`fsq_levels_grid` on ``device``, made once per (levels, device)."""
    return _grid_cache(tuple(int(L) for L in levels), torch.device(device))


@functools.lru_cache(maxsize=32)
def _grid_cache(levels: tuple, device: torch.device) -> list[torch.Tensor]:
    return [g.to(device) for g in fsq_levels_grid(levels)]


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
    against the installed vector-quantize-pytorch). ``levels``: a list, or a tensor already
    on ``z``'s device (no host-to-device copy per step).
    """
    L = (levels.to(z.device, torch.float32) if torch.is_tensor(levels)
         else torch.as_tensor(list(levels), dtype=torch.float32, device=z.device))
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
    # the module's level buffer, on the device already (``.tolist()`` would sync every step)
    return fsq_prerounding(fsq.project_in(z), fsq._levels, hard_clamp=fsq.bound_hard_clamp)


def quantise(fsq, quant_in: torch.Tensor) -> dict:
    """The model's quantiser outputs for its shaped encoder output ``quant_in (B, L, d)``:
    ``quant_in``, ``z_bounded`` (float32, on FSQ's integer level grid: the regulariser's
    input), ``quantized`` and ``codes`` ``(B, L)`` int64."""
    # FSQ quantises in float32 anyway; keep the bounded value (regulariser input) in f32
    with torch.autocast(device_type=quant_in.device.type, enabled=False):
        zf = quant_in.float()
        z_bounded = fsq_prerounding_from_module(fsq, zf)
        quantized, codes = fsq(zf)
    return {"quant_in": quant_in, "z_bounded": z_bounded, "quantized": quantized, "codes": codes.long()}
