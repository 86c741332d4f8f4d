"""What the model gets from a batch besides the velocities: the clip's reference start
positions ``(B, N, 2)`` px (``batch["positions"][:, 0]``) once the loader provides
``positions``; one helper so that train, validation, frontier and tokenize pass the same."""
from __future__ import annotations


def model_kwargs(batch: dict) -> dict:
    """``{"start_pos": positions[:, 0]}`` when the batch has positions, else ``{}`` (the
    model then runs without them)."""
    pos = batch.get("positions")
    return {} if pos is None else {"start_pos": pos[:, 0]}
