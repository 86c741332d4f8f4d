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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ

from tokenizer_train.common.config import ModelConfig
from tokenizer_train.model.decoder_heads import AmplifyHead, CodeQueryHead
from tokenizer_train.model.gather import gather_rows, point_rows, unravel
from tokenizer_train.model.fsq_geometry import fsq_prerounding_from_module
from tokenizer_train.model.point_features import PointEncoder, fourier_features, group_of_points, motion_position_features
from tokenizer_train.model.shaping import QuantInputShaping
from motion_data.common.errors import SettingError


def _causal_mask(S: int, device) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(S, device=device)


def _step_causal_mask(step_of_token: torch.Tensor) -> torch.Tensor:
    """Float mask: a token sees every token of its own and earlier steps (several tokens per step)."""
    later = step_of_token[None, :] > step_of_token[:, None]
    return torch.zeros(later.shape, device=step_of_token.device).masked_fill(later, float("-inf"))


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

        G = cfg.groups
        self.register_buffer("group", group_of_points(num_points, G), persistent=False)  # (N,) point -> group
        pe = cfg.point_pos_enc
        n_phi = 4 * pe.num_freqs if pe.enabled else 0

        # encoder
        if cfg.point_encoder.enabled:
            self.in_proj = nn.Linear(num_points // G * cfg.point_encoder.dim, D)
        else:
            self.in_proj = nn.Linear(2 * num_points // G, D)
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
        if not pe.enabled:
            self.point_emb = nn.Parameter(torch.randn(num_points, D) * 0.02)
        if cfg.decoder != "amplify":
            self.head_time = nn.Linear(D, H)
        if cfg.decoder == "additive":
            self.head_point = nn.Linear(D, H, bias=False)
        if cfg.decoder != "amplify":
            self.head_out = nn.Linear(H, self.num_classes)
        # the switches' own parts (created after the default ones: same default init)
        if cfg.decoder == "code_query":
            self.code_query = CodeQueryHead(D, H, cfg.max_steps)
        elif cfg.decoder == "amplify":
            self.amplify = AmplifyHead(D, cfg.amplify_mlp_dim, self.num_classes)
        if pe.enabled:
            self.point_pos = nn.Linear(n_phi, D)  # the decoder's point query
            if not cfg.point_encoder.enabled:
                self.enc_pos = nn.Linear(2 * n_phi, D)  # velocity-weighted position features
        if cfg.point_encoder.enabled:
            self.point_encoder = PointEncoder(2 + 2 * n_phi, cfg.point_encoder.dim)
        if G > 1:
            self.enc_group = nn.Parameter(torch.randn(G, D) * 0.02)
            self.dec_group = nn.Parameter(torch.randn(G, D) * 0.02)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.groups

    def _phi(self, start_pos, B: int):
        """Fourier features ``(B, N, 4F)`` of the start positions, or None when the switch is off."""
        if not self.cfg.point_pos_enc.enabled:
            return None
        if start_pos is None:
            raise ValueError("model.point_pos_enc.enabled needs start_pos (B, N, 2) reference px: pass "
                             "batch['positions'][:, 0], or set model.point_pos_enc.enabled=false")
        if tuple(start_pos.shape) != (B, self.num_points, 2):
            raise ValueError(f"start_pos must be ({B}, {self.num_points}, 2), got {tuple(start_pos.shape)}")
        return fourier_features(start_pos, self.cfg.point_pos_enc.num_freqs)

    def _step_of_token(self, steps: int, device) -> torch.Tensor:
        return torch.arange(steps * self.cfg.groups, device=device) // self.cfg.groups

    def _tokens(self, velocities, phi):
        """``(B, S, N, 2)`` -> encoder input ``(B, S*G, D)`` (step-major, G tokens per step)."""
        B, S, N, _ = velocities.shape
        G = self.cfg.groups
        if self.cfg.point_encoder.enabled:
            x = velocities if phi is None else torch.cat([velocities, motion_position_features(velocities, phi)], -1)
            return self.in_proj(self.point_encoder(x).reshape(B, S * G, -1))
        x = self.in_proj(velocities.reshape(B, S * G, 2 * N // G))
        if phi is not None:
            mpf = motion_position_features(velocities, phi).reshape(B, S * G, N // G, -1).mean(2)
            x = x + self.enc_pos(mpf)
        return x

    def encode(self, velocities: torch.Tensor, start_pos: torch.Tensor | None = None) -> dict:
        """velocities ``(B, S, N, 2)``, start_pos ``(B, N, 2)`` reference px (needed by
        model.point_pos_enc) -> quant_in, z_bounded ``(B, L, d)``, quantized, codes ``(B, L)``
        with L = S * model.groups tokens (step-major)."""
        B, S, N, _ = velocities.shape
        if N != self.num_points:
            raise SettingError(f"model was built for {self.num_points} points, batch has {N}")
        if S > self.cfg.max_steps:
            raise SettingError(f"clip has {S} steps > model.max_steps={self.cfg.max_steps}")
        G = self.cfg.groups
        step = self._step_of_token(S, velocities.device)
        x = self._tokens(velocities, self._phi(start_pos, B)) + self.enc_time(step)
        if G == 1:
            x = self.encoder(x, mask=_causal_mask(S, velocities.device), is_causal=True)
        else:
            x = self.encoder(x + self.enc_group.repeat(S, 1), mask=_step_causal_mask(step))
        quant_in = self.shaping(self.to_fsq(x))
        # FSQ quantises in float32 anyway; keep the bounded value (regulariser input) in f32
        with torch.autocast(device_type=velocities.device.type, enabled=False):
            zf = quant_in.float()
            # on FSQ's integer level grid (fsq_geometry.fsq_levels_grid): the regulariser's input
            z_bounded = fsq_prerounding_from_module(self.fsq, zf)
            quantized, codes = self.fsq(zf)
        return {"quant_in": quant_in, "z_bounded": z_bounded, "quantized": quantized,
                "codes": codes.long()}

    def _point_query(self, phi):
        """The decoder's point query: ``(N, D)`` learned per index, or ``(B, N, D)`` from the start positions."""
        return self.point_emb if phi is None else self.point_pos(phi)

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
        B, L, _ = quantized.shape
        G = self.cfg.groups
        if L % G:
            raise ValueError(f"quantized has {L} tokens, not a multiple of model.groups={G}")
        S, N = L // G, self.num_points
        step = self._step_of_token(S, quantized.device)
        point = self._point_query(self._phi(start_pos, B))
        point = point if point.ndim == 3 else point[None]  # (B or 1, N, D)
        code_feat = self.from_fsq(quantized)
        sel = None if index is None else unravel(index, S, N)
        if self.cfg.decoder == "amplify":
            # zero queries plus their step (and group) embedding, non-causal attention to the codes
            tgt = self.dec_time(step).expand(B, -1, -1)
            if G > 1:
                tgt = tgt + self.dec_group.repeat(S, 1)
            h = self.decoder(tgt, code_feat)
            return self.amplify.features(h.reshape(B, S, G, -1), point, self.group, sel)
        y = code_feat + self.dec_time(step)
        if G == 1:
            mask = _causal_mask(S, quantized.device)
            h = self.decoder(y, y, tgt_mask=mask, memory_mask=mask, tgt_is_causal=True, memory_is_causal=True)
        else:
            y = y + self.dec_group.repeat(S, 1)
            mask = _step_causal_mask(step)
            h = self.decoder(y, y, tgt_mask=mask, memory_mask=mask)
        a = self.head_time(h)  # (B, L, H)
        if self.cfg.decoder == "code_query":
            # one step feature for all points (group tokens averaged: no per-group prior either);
            # what differs between points comes only through the codes
            a = a[:, :, None, :] if G == 1 else a.reshape(B, S, G, -1).mean(2, keepdim=True)  # (B, S, 1, H)
            if sel is None:
                return F.gelu(a + self.code_query(code_feat, point, S, step))
            b, s, n = sel
            return F.gelu(gather_rows(a[:, :, 0], b, s) + self.code_query.select(code_feat, point, S, step, b, s, n))
        a = a.reshape(B, S, G, -1)  # (B, S, G, H): the step feature of each point's group
        p = self.head_point(point)  # (B or 1, N, H)
        if sel is None:
            return F.gelu((a if G == 1 else a[:, :, self.group]) + p[:, None])
        b, s, n = sel
        return F.gelu(gather_rows(a, b, s, self.group[n]) + point_rows(p, b, n))

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
