"""Rows of the decoder's tensors at the entries it decodes (model.decode ``index``)."""
from __future__ import annotations

import torch


def unravel(index: torch.Tensor, S: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices into ``(B, S, N)`` -> (clip, step, point) index tensors."""
    return index // (S * N), (index // N) % S, index % N


def gather_rows(x: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """``x[i0, i1, ...]`` for ``x (D0, D1, ..., H)`` and index tensors of the leading dims, as
    ``(P, H)`` through ``index_select``: its backward adds repeated rows in a fixed order,
    advanced indexing's does not on a CPU (a run would not repeat itself bit for bit)."""
    flat = index[0]
    for d, i in zip(x.shape[1:len(index)], index[1:]):
        flat = flat * d + i
    return x.reshape(-1, x.shape[-1]).index_select(0, flat)


def point_rows(p: torch.Tensor, b: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Rows ``(b, n)`` of a per-point tensor ``(B or 1, N, H)`` (1: shared by every clip)."""
    return gather_rows(p, b, n) if p.shape[0] > 1 else gather_rows(p[0], n)
