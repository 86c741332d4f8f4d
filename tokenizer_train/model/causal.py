"""Causal attention over time steps for the tokenizer's encoder and decoder stacks.

A clip has S steps of G tokens each (step-major). A token sees every token of its own and of
earlier steps. With one token per step the mask is PyTorch's square causal mask, passed with
``is_causal`` so that the stacks may take their causal fast path.
"""
from __future__ import annotations

import torch
from torch import nn


def step_of_token(steps: int, groups: int, device) -> torch.Tensor:
    """``(steps * groups,)``: the step of each token."""
    return torch.arange(steps * groups, device=device) // groups


def _step_causal_mask(step_of_token: torch.Tensor) -> torch.Tensor:
    """Float mask: a token sees every token of its own and earlier steps (several tokens per step)."""
    later = step_of_token[None, :] > step_of_token[:, None]
    return torch.zeros(later.shape, device=step_of_token.device).masked_fill(later, float("-inf"))


def _square_mask(n: int, device) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n, device=device)


def encode_causal(encoder: nn.TransformerEncoder, x: torch.Tensor, step: torch.Tensor,
                  group_emb: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder stack over tokens ``x (B, L, D)`` of steps ``step (L,)``; ``group_emb (L, D)``
    (each token's group embedding) with several tokens per step, else None."""
    if group_emb is None:
        return encoder(x, mask=_square_mask(len(step), x.device), is_causal=True)
    return encoder(x + group_emb, mask=_step_causal_mask(step))


def decode_causal(decoder: nn.TransformerDecoder, y: torch.Tensor, step: torch.Tensor,
                  group_emb: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder stack over tokens ``y (B, L, D)`` attending to themselves as memory, under
    the same causal rule as :func:`encode_causal`."""
    if group_emb is None:
        mask = _square_mask(len(step), y.device)
        return decoder(y, y, tgt_mask=mask, memory_mask=mask, tgt_is_causal=True, memory_is_causal=True)
    y = y + group_emb
    mask = _step_causal_mask(step)
    return decoder(y, y, tgt_mask=mask, memory_mask=mask)
