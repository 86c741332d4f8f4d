"""The tokenizer's layers, made in one fixed order.

``MotionTokenizer`` registers them under these names, so the names are the checkpoints'
state-dict keys and the order is that of ``parameters()`` (the optimizer state's order) and
of the random initialisation under a seed: a default model is the same whatever switches
exist. The parts of a switch come after the default ones.
"""
from __future__ import annotations

import torch
from torch import nn
from vector_quantize_pytorch import FSQ

from tokenizer_train.common.config import ModelConfig
from tokenizer_train.model.decoder_heads import AmplifyHead, CodeQueryHead
from tokenizer_train.model.point_features import PointEncoder
from tokenizer_train.model.shaping import QuantInputShaping


def _layer(kind, cfg: ModelConfig):
    D = cfg.hidden_dim
    return kind(D, cfg.num_heads, dim_feedforward=cfg.mlp_ratio * D, dropout=cfg.dropout,
                activation="gelu", batch_first=True, norm_first=True)


def _encoder_parts(cfg: ModelConfig, num_points: int) -> dict:
    D, G, d = cfg.hidden_dim, cfg.groups, len(cfg.fsq_levels)
    # a token's input: its points' encoded features, or their velocities
    width = num_points // G * cfg.point_encoder.dim if cfg.point_encoder.enabled else 2 * num_points // G
    return {"in_proj": nn.Linear(width, D),
            "enc_time": nn.Embedding(cfg.max_steps, D),
            "encoder": nn.TransformerEncoder(_layer(nn.TransformerEncoderLayer, cfg), cfg.num_layers,
                                             norm=nn.LayerNorm(D), enable_nested_tensor=False),
            "to_fsq": nn.Linear(D, d),
            "shaping": QuantInputShaping(d, cfg.quant_input_norm, cfg.quant_input_tanh_scale,
                                         cfg.quant_input_noise_std),
            "fsq": FSQ(levels=list(cfg.fsq_levels))}


def _decoder_parts(cfg: ModelConfig, num_points: int, num_classes: int) -> dict:
    D, d = cfg.hidden_dim, len(cfg.fsq_levels)
    H = min(D, num_classes)
    parts = {"from_fsq": nn.Linear(d, D),
             "dec_time": nn.Embedding(cfg.max_steps, D),
             "decoder": nn.TransformerDecoder(_layer(nn.TransformerDecoderLayer, cfg), cfg.n_decoder_layers,
                                              norm=nn.LayerNorm(D))}
    if not cfg.point_pos_enc.enabled:
        parts["point_emb"] = nn.Parameter(torch.randn(num_points, D) * 0.02)
    if cfg.decoder != "amplify":
        parts["head_time"] = nn.Linear(D, H)
    if cfg.decoder == "additive":
        parts["head_point"] = nn.Linear(D, H, bias=False)
    if cfg.decoder != "amplify":
        parts["head_out"] = nn.Linear(H, num_classes)
    return parts


def _switch_parts(cfg: ModelConfig, num_classes: int) -> dict:
    D, G = cfg.hidden_dim, cfg.groups
    pe, pt = cfg.point_pos_enc, cfg.point_encoder
    n_phi = 4 * pe.num_freqs if pe.enabled else 0
    parts = {}
    if cfg.decoder == "code_query":
        parts["code_query"] = CodeQueryHead(D, min(D, num_classes), cfg.max_steps)
    elif cfg.decoder == "amplify":
        parts["amplify"] = AmplifyHead(D, cfg.amplify_mlp_dim, num_classes)
    if pe.enabled:
        parts["point_pos"] = nn.Linear(n_phi, D)  # the decoder's point query
        if not pt.enabled:
            parts["enc_pos"] = nn.Linear(2 * n_phi, D)  # velocity-weighted position features
    if pt.enabled:
        parts["point_encoder"] = PointEncoder(2 + 2 * n_phi, pt.dim)
    if G > 1:
        parts["enc_group"] = nn.Parameter(torch.randn(G, D) * 0.02)
        parts["dec_group"] = nn.Parameter(torch.randn(G, D) * 0.02)
    return parts


def tokenizer_parts(cfg: ModelConfig, num_points: int, num_classes: int) -> dict[str, nn.Module | nn.Parameter]:
    """Name -> layer or parameter, in the order they are made and registered: the encoder and
    the quantiser, the decoder and its heads, then the switches' own parts."""
    return {**_encoder_parts(cfg, num_points), **_decoder_parts(cfg, num_points, num_classes),
            **_switch_parts(cfg, num_classes)}
