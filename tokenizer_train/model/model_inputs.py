"""What the model gets from a batch besides the velocities: the clip's reference start
positions ``(B, N, 2)`` px (``batch["positions"][:, 0]``) once the loader provides
``positions``, and which (clip, step, point) entries to decode; one place so that train,
validation, frontier and tokenize pass the same."""
from __future__ import annotations

import torch


def model_kwargs(batch: dict) -> dict:
    """``{"start_pos": positions[:, 0]}`` when the batch has positions, else ``{}`` (the
    model then runs without them)."""
    pos = batch.get("positions")
    return {} if pos is None else {"start_pos": pos[:, 0]}


def flat_index(mask: torch.Tensor) -> torch.Tensor:
    """``(P,)`` int64 flat indices of the true entries of ``mask (B, S, N)``, in order: the
    entries the decoder computes (model.decode ``index``). Called on the loader's host tensors
    before they go to the device, so that a GPU step never waits for a count (docs/DESIGN.md,
    Trainer: "Compute only what the loss sees")."""
    return mask.reshape(-1).nonzero()[:, 0]


def take(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``x (B, S, N, ...)`` at the flat ``index`` (``(P, ...)``); every entry, flattened, for None."""
    B, S, N = x.shape[:3]
    flat = x.reshape(B * S * N, *x.shape[3:])
    return flat if index is None else flat[index]


def with_index(batch: dict, key: str, *masks: str) -> dict:
    """``batch`` (host tensors) plus ``batch[key]``: the flat index of the union of ``masks``."""
    m = batch[masks[0]]
    for k in masks[1:]:
        m = m | batch[k]
    return {**batch, key: flat_index(m)}


def entry_clip(index: torch.Tensor | None, shape) -> torch.Tensor:
    """The clip (0..B-1) of each entry that ``take(x, index)`` gives, for ``shape = (B, S, N)``."""
    B, S, N = shape
    if index is None:
        return torch.arange(B).repeat_interleave(S * N)
    return index // (S * N)
