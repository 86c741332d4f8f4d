"""The tokenizer's decoder pass: quantized tokens -> decoder stack -> per-point features, the
input of the decoder's last layer (``MotionTokenizer.out_layer``).

The default and ``code_query`` decoders attend causally to the tokens themselves;
``amplify``'s zero queries attend to all of them (decoder_heads.py).
"""
from __future__ import annotations

import torch

from tokenizer_train.model.causal import decode_causal, step_of_token
from tokenizer_train.model.decoder_heads import additive_features
from tokenizer_train.model.gather import unravel
from tokenizer_train.model.point_features import start_features


def decode_features(m, quantized: torch.Tensor, start_pos: torch.Tensor | None,
                    index: torch.Tensor | None) -> torch.Tensor:
    """``MotionTokenizer.decode_features``: ``(B, S, N, H)``, or ``(P, H)`` at the flat ``index``."""
    B, L, _ = quantized.shape
    G = m.cfg.groups
    if L % G:
        raise ValueError(f"quantized has {L} tokens, not a multiple of model.groups={G}")
    S, N = L // G, m.num_points
    step = step_of_token(S, G, quantized.device)
    phi = start_features(start_pos, m.cfg.point_pos_enc, B, N)
    point = m.point_emb[None] if phi is None else m.point_pos(phi)  # the point query (B or 1, N, D)
    code_feat = m.from_fsq(quantized)
    sel = None if index is None else unravel(index, S, N)
    group_emb = m.dec_group.repeat(S, 1) if G > 1 else None
    if m.cfg.decoder == "amplify":
        # zero queries plus their step (and group) embedding, non-causal attention to the codes
        tgt = m.dec_time(step).expand(B, -1, -1)
        h = m.decoder(tgt if group_emb is None else tgt + group_emb, code_feat)
        return m.amplify.features(h.reshape(B, S, G, -1), point, m.group, sel)
    h = decode_causal(m.decoder, code_feat + m.dec_time(step), step, group_emb)
    a = m.head_time(h).reshape(B, S, G, -1)  # (B, S, G, H): the step feature of each group
    if m.cfg.decoder == "code_query":
        return m.code_query.features(a, code_feat, point, step, sel)
    return additive_features(a, m.head_point(point), m.group, sel)
