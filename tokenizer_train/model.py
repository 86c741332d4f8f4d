"""The AMPLIFY-style motion tokenizer: causal encoder -> (shaping) -> FSQ -> decoder -> logits.

One token per time step: the N points' normalised velocities of a step are flattened and
projected to ``hidden_dim``. The decoder attends (causally) to the quantised tokens and
predicts, for every (step, point), a distribution over the W*W displacement classes from
the step's feature plus a learned per-point embedding. Nothing is copied across time.

Memory: the head's first layer is split into a per-step part ``(B, S, H)`` and a per-point
part ``(N, H)`` that are broadcast-added, so no ``(B, S, N, 3*hidden)`` concatenation exists;
with ``H = min(hidden_dim, W*W)`` the logits ``(B, S, N, W*W)`` are the largest activation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ

from .config import ModelConfig
from .losses import fsq_prerounding_from_module
from .shaping import QuantInputShaping


def _causal_mask(S: int, device) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(S, device=device)


class MotionTokenizer(nn.Module):
    def __init__(self, cfg: ModelConfig, num_points: int, window_size: int):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_dim
        self.num_points = num_points
        self.num_classes = window_size * window_size
        self.levels = list(cfg.fsq_levels)
        self.codebook_size = math.prod(self.levels)
        d = len(self.levels)

        def layer(kind):
            return kind(D, cfg.num_heads, dim_feedforward=cfg.mlp_ratio * D, dropout=cfg.dropout,
                        activation="gelu", batch_first=True, norm_first=True)

        # encoder
        self.in_proj = nn.Linear(2 * num_points, D)
        self.enc_time = nn.Embedding(cfg.max_steps, D)
        self.encoder = nn.TransformerEncoder(layer(nn.TransformerEncoderLayer), cfg.num_layers,
                                             norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.to_fsq = nn.Linear(D, d)
        self.shaping = QuantInputShaping(d, cfg.quant_input_norm, cfg.quant_input_tanh_scale,
                                         cfg.quant_input_noise_std)
        self.fsq = FSQ(levels=self.levels)
        # decoder
        self.from_fsq = nn.Linear(d, D)
        self.dec_time = nn.Embedding(cfg.max_steps, D)
        self.decoder = nn.TransformerDecoder(layer(nn.TransformerDecoderLayer), cfg.n_decoder_layers,
                                             norm=nn.LayerNorm(D))
        H = min(D, self.num_classes)
        self.point_emb = nn.Parameter(torch.randn(num_points, D) * 0.02)
        self.head_time = nn.Linear(D, H)
        self.head_point = nn.Linear(D, H, bias=False)
        self.head_out = nn.Linear(H, self.num_classes)

    def encode(self, velocities: torch.Tensor) -> dict:
        """velocities ``(B, S, N, 2)`` -> quant_in, z_bounded ``(B, S, d)``, quantized, codes ``(B, S)``."""
        B, S, N, _ = velocities.shape
        if N != self.num_points:
            raise ValueError(f"model was built for {self.num_points} points, batch has {N}")
        if S > self.cfg.max_steps:
            raise ValueError(f"clip has {S} steps > model.max_steps={self.cfg.max_steps}")
        pos = torch.arange(S, device=velocities.device)
        x = self.in_proj(velocities.reshape(B, S, 2 * N)) + self.enc_time(pos)
        mask = _causal_mask(S, velocities.device)
        x = self.encoder(x, mask=mask, is_causal=True)
        quant_in = self.shaping(self.to_fsq(x))
        # FSQ quantises in float32 anyway; keep the bounded value (regulariser input) in f32
        with torch.autocast(device_type=velocities.device.type, enabled=False):
            zf = quant_in.float()
            # on FSQ's integer level grid (losses.fsq_levels_grid): the regulariser's input
            z_bounded = fsq_prerounding_from_module(self.fsq, zf)
            quantized, codes = self.fsq(zf)
        return {"quant_in": quant_in, "z_bounded": z_bounded, "quantized": quantized,
                "codes": codes.long()}

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized ``(B, S, d)`` -> logits ``(B, S, N, W*W)``."""
        B, S, _ = quantized.shape
        pos = torch.arange(S, device=quantized.device)
        y = self.from_fsq(quantized) + self.dec_time(pos)
        mask = _causal_mask(S, quantized.device)
        h = self.decoder(y, y, tgt_mask=mask, memory_mask=mask, tgt_is_causal=True, memory_is_causal=True)
        a = self.head_time(h)  # (B, S, H)
        b = self.head_point(self.point_emb)  # (N, H)
        return self.head_out(F.gelu(a[:, :, None, :] + b[None, None]))

    def forward(self, velocities: torch.Tensor) -> dict:
        out = self.encode(velocities)
        out["logits"] = self.decode(out["quantized"])
        return out

    @torch.no_grad()
    def zero_codes(self, steps: int) -> torch.Tensor:
        """``(steps,)`` code id that all-zero motion maps to at each step (eval mode).

        It depends on the step because of the time embedding; a token "is on the zero code"
        when its id equals the zero code of its own step.
        """
        was = self.training
        self.eval()
        try:
            dev = self.in_proj.weight.device
            z = torch.zeros(1, steps, self.num_points, 2, device=dev)
            return self.encode(z)["codes"][0]
        finally:
            self.train(was)
