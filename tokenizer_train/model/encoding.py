"""The tokenizer's encoder pass: velocities -> one token per step (or per group of points) ->
causal encoder -> quantiser shaping -> FSQ codes.

Functions of a ``MotionTokenizer`` ``m``: they run its layers (parts.py names) in order.
"""
from __future__ import annotations

import torch

from tokenizer_train.model.causal import encode_causal, step_of_token
from tokenizer_train.model.fsq_geometry import quantise
from tokenizer_train.model.point_features import motion_position_features, start_features
from motion_data.common.errors import SettingError


def encoder_input(m, velocities: torch.Tensor, phi: torch.Tensor | None) -> torch.Tensor:
    """``(B, S, N, 2)`` -> encoder input ``(B, S*G, D)`` (step-major, G tokens per step);
    ``phi``: the start positions' features, or None."""
    B, S, N, _ = velocities.shape
    G = m.cfg.groups
    if m.cfg.point_encoder.enabled:
        x = velocities if phi is None else torch.cat([velocities, motion_position_features(velocities, phi)], -1)
        return m.in_proj(m.point_encoder(x).reshape(B, S * G, -1))
    x = m.in_proj(velocities.reshape(B, S * G, 2 * N // G))
    if phi is not None:
        mpf = motion_position_features(velocities, phi).reshape(B, S * G, N // G, -1).mean(2)
        x = x + m.enc_pos(mpf)
    return x


def encode(m, velocities: torch.Tensor, start_pos: torch.Tensor | None) -> dict:
    """``MotionTokenizer.encode``: quant_in, z_bounded, quantized ``(B, L, d)`` and codes ``(B, L)``."""
    B, S, N, _ = velocities.shape
    if N != m.num_points:
        raise SettingError(f"model was built for {m.num_points} points, batch has {N}")
    if S > m.cfg.max_steps:
        raise SettingError(f"clip has {S} steps > model.max_steps={m.cfg.max_steps}")
    step = step_of_token(S, m.cfg.groups, velocities.device)
    x = encoder_input(m, velocities, start_features(start_pos, m.cfg.point_pos_enc, B, N)) + m.enc_time(step)
    x = encode_causal(m.encoder, x, step, m.enc_group.repeat(S, 1) if m.cfg.groups > 1 else None)
    return quantise(m.fsq, m.shaping(m.to_fsq(x)))
