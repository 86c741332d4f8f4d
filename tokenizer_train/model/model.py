"""The AMPLIFY-style motion tokenizer: causal encoder -> (shaping) -> FSQ -> decoder -> logits.

One token per time step: the N points' normalised velocities of a step are flattened and
projected to ``hidden_dim``. The decoder attends (causally) to the quantised tokens and
predicts, for every (step, point), a distribution over the W*W displacement classes from
the step's feature plus a learned per-point embedding. Nothing is copied across time.

Memory: the head's first layer is split into a per-step part ``(B, S, H)`` and a per-point
part ``(N, H)`` that are broadcast-added, so no ``(B, S, N, 3*hidden)`` concatenation exists.
Training and validation decode only the entries their masks score (``index``: the per-step
and per-point parts are gathered first), and the trainer's loss applies the last layer in
chunks (fused_ce), so the ``(B, S, N, W*W)`` logits exist only where a caller asks for every
point (decode, draw, the Python API).

Switches (each off by default, the default model is the one above bit for bit):
``model.decoder`` (``code_query``: no free per-point prior path; ``amplify``: AMPLIFY's
non-causal zero-query decoder, see decoder_heads.py), ``model.point_pos_enc`` (Fourier
features of each point's start position in the encoder input and as the decoder's point
query, instead of the learned per-index embedding), ``model.point_encoder`` (one MLP shared by
all points before the step projection) and ``model.groups`` (G tokens per step, one per block
of points: codes ``(B, S*G)``, step-major; see point_features.py).

This class holds the layers (made in parts.py, whose names are the checkpoints' keys) and
is the model's interface; its passes run in encoding.py and decoding.py, with the causal
masks of causal.py and the per-point heads of decoder_heads.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tokenizer_train.common.config import ModelConfig
from tokenizer_train.model import decoding, encoding
from tokenizer_train.model.parts import tokenizer_parts
from tokenizer_train.model.point_features import group_of_points


class MotionTokenizer(nn.Module):
    def __init__(self, cfg: ModelConfig, num_points: int, window_size: int):
        super().__init__()
        self.cfg, self.num_points = cfg, num_points
        self.num_classes = window_size * window_size
        self.levels = list(cfg.fsq_levels)
        self.codebook_size = math.prod(self.levels)
        self.register_buffer("group", group_of_points(num_points, cfg.groups), persistent=False)  # (N,) point -> group
        for name, part in tokenizer_parts(cfg, num_points, self.num_classes).items():
            setattr(self, name, part)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.groups

    def encode(self, velocities: torch.Tensor, start_pos: torch.Tensor | None = None) -> dict:
        """velocities ``(B, S, N, 2)``, start_pos ``(B, N, 2)`` reference px (needed by
        model.point_pos_enc) -> quant_in, z_bounded ``(B, L, d)``, quantized, codes ``(B, L)``
        with L = S * model.groups tokens (step-major)."""
        return encoding.encode(self, velocities, start_pos)

    @property
    def out_layer(self) -> nn.Linear:
        """The decoder's last layer: features ``(..., H)`` -> logits ``(..., W*W)`` (fused_ce
        applies it chunk by chunk in training)."""
        return self.amplify.proj if self.cfg.decoder == "amplify" else self.head_out

    def decode(self, quantized: torch.Tensor, start_pos: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> torch.Tensor:
        """quantized ``(B, L, d)`` (L = S * model.groups) -> logits ``(B, S, N, W*W)``, or
        ``(P, W*W)`` for the ``P`` entries of ``index`` (flat indices into ``(B, S, N)``,
        model_inputs.flat_index): only those entries are computed.

        Depends on the codes only through ``quantized`` (code information decodes one clip's
        quantized with another clip's start_pos)."""
        return self.out_layer(self.decode_features(quantized, start_pos, index))

    def decode_features(self, quantized: torch.Tensor, start_pos: torch.Tensor | None = None,
                        index: torch.Tensor | None = None) -> torch.Tensor:
        """What ``decode`` feeds its last layer: ``(B, S, N, H)``, or ``(P, H)`` for ``index``."""
        return decoding.decode_features(self, quantized, start_pos, index)

    def forward(self, velocities: torch.Tensor, start_pos: torch.Tensor | None = None,
                index: torch.Tensor | None = None, features: bool = False) -> dict:
        """``encode``'s outputs plus ``logits`` (``decode``), or ``features`` with ``features=True``
        (``decode_features``: the trainer's fused loss applies ``out_layer``); ``index``
        limits decoding to those entries."""
        out = self.encode(velocities, start_pos)
        f = self.decode_features(out["quantized"], start_pos, index)
        out["features" if features else "logits"] = f if features else self.out_layer(f)
        return out

    @torch.no_grad()
    def zero_codes(self, steps: int) -> torch.Tensor:
        """``(steps * model.groups,)`` code id that all-zero motion maps to at each token (eval mode).

        It depends on the step (and group) because of the time embedding; a token "is on the
        zero code" when its id equals the zero code of its own position. Positions enter the
        encoder only through motion, so no start positions are needed.
        """
        was = self.training
        self.eval()
        try:
            dev = self.in_proj.weight.device
            z = torch.zeros(1, steps, self.num_points, 2, device=dev)
            start = torch.zeros(1, self.num_points, 2, device=dev) if self.cfg.point_pos_enc.enabled else None
            return self.encode(z, start)["codes"][0]
        finally:
            self.train(was)
