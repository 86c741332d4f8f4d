"""The model switches of issue 12 (model.decoder, point_pos_enc, point_encoder, groups)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer_train.common.config import from_dict
from tokenizer_train.model.model import MotionTokenizer
from tokenizer_train.model.model_inputs import model_kwargs
from tokenizer_train.model.point_features import fourier_features, group_of_points

S, N, W = 5, 12, 5
TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 4, "max_steps": 8}
SWITCHES = {
    "code_query": {"decoder": "code_query"},
    "amplify": {"decoder": "amplify"},
    "pos_enc": {"point_pos_enc": {"enabled": True}},
    "point_encoder": {"point_encoder": {"enabled": True}},
    "groups": {"groups": 3},
    "all_code_query": {"decoder": "code_query", "groups": 4, "point_pos_enc": {"enabled": True},
                       "point_encoder": {"enabled": True}},
    "all_amplify": {"decoder": "amplify", "groups": 2, "point_pos_enc": {"enabled": True},
                    "point_encoder": {"enabled": True}},
}


def tiny(seed=0, **model):
    torch.manual_seed(seed)
    cfg = from_dict({"model": {**TINY, **model}}).model
    return MotionTokenizer(cfg, num_points=N, window_size=W).eval()


def start_pos(B=2, seed=5):
    return torch.rand(B, N, 2, generator=torch.Generator().manual_seed(seed)) * 128


def _old_forward(m, x):
    """The model as it was before the switches (reference for 'switches off == old')."""
    B = x.shape[0]
    pos = torch.arange(S)
    mask = nn.Transformer.generate_square_subsequent_mask(S)
    h = m.encoder(m.in_proj(x.reshape(B, S, 2 * N)) + m.enc_time(pos), mask=mask, is_causal=True)
    quantized, codes = m.fsq(m.shaping(m.to_fsq(h)).float())
    y = m.from_fsq(quantized) + m.dec_time(pos)
    h = m.decoder(y, y, tgt_mask=mask, memory_mask=mask, tgt_is_causal=True, memory_is_causal=True)
    a, b = m.head_time(h), m.head_point(m.point_emb)
    return codes.long(), m.head_out(F.gelu(a[:, :, None, :] + b[None, None]))


def test_switches_off_is_the_old_model_bit_for_bit():
    m = tiny()
    assert [k for k in m.state_dict()] == [k for k in tiny(decoder="additive", groups=1).state_dict()]
    assert not any(k.startswith(("code_query", "amplify", "point_pos", "enc_pos", "point_encoder", "enc_group"))
                   for k in m.state_dict())
    x = torch.randn(3, S, N, 2)
    out = m(x)
    codes, logits = _old_forward(m, x)
    assert torch.equal(out["codes"], codes) and torch.equal(out["logits"], logits)
    assert torch.equal(m(x, start_pos(3))["logits"], logits)  # start_pos is unused without the switch


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_shapes_gradients_and_zero_codes(name):
    sw = SWITCHES[name]
    G = sw.get("groups", 1)
    m = tiny(**sw).train()
    sp = start_pos()
    out = m(torch.randn(2, S, N, 2), sp)
    assert out["logits"].shape == (2, S, N, W * W)
    assert out["codes"].shape == (2, S * G) and out["quantized"].shape == (2, S * G, 4)
    assert out["z_bounded"].shape == (2, S * G, 4)
    out["logits"].logsumexp(-1).mean().backward()
    silent = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"no gradient reaches {silent}"
    # zero codes: one per token position, needing no positions (positions enter through motion only)
    m.eval()
    zc = m.zero_codes(S)
    assert zc.shape == (S * G,)
    assert torch.equal(m(torch.zeros(2, S, N, 2), sp)["codes"], zc.expand(2, -1))
    assert m.tokens_per_step == G


@pytest.mark.parametrize("name", ["code_query", "all_code_query"])
def test_code_query_decoder_has_no_per_point_prior(name):
    m = tiny(**SWITCHES[name])
    G = SWITCHES[name].get("groups", 1)
    sp = start_pos()
    out = m(torch.randn(2, S, N, 2), sp)
    q = out["quantized"]
    # codes held fixed (every token the same code): every point gets the same prediction
    same = q[:, :1].expand(-1, S * G, -1).contiguous()
    logits = m.decode(same, sp)
    assert torch.allclose(logits, logits[:, :, :1].expand_as(logits), atol=1e-6)
    # and the codes do change the prediction, also across points
    other = m.decode(torch.roll(q, 1, dims=0), sp)
    assert not torch.allclose(other, out["logits"], atol=1e-4)
    assert not torch.allclose(out["logits"], out["logits"][:, :, :1].expand_as(out["logits"]), atol=1e-4)
    # the additive head, by contrast, predicts a per-point prior from fixed codes
    a = tiny(**{k: v for k, v in SWITCHES[name].items() if k != "decoder"})
    la = a.decode(same, sp)
    assert not torch.allclose(la, la[:, :, :1].expand_as(la), atol=1e-4)


def test_decode_takes_another_clips_codes_with_its_own_positions():
    """What the code-information metric does: clip i decoded with clip j's quantized."""
    m = tiny(**SWITCHES["all_code_query"])
    sp = start_pos(3)
    out = m(torch.randn(3, S, N, 2), sp)
    perm = torch.tensor([1, 2, 0])
    swapped = m.decode(out["quantized"][perm], sp)
    assert swapped.shape == out["logits"].shape
    assert torch.allclose(m.decode(out["quantized"], sp), out["logits"], atol=1e-6)


def test_position_encoding_is_required_and_used():
    m = tiny(point_pos_enc={"enabled": True}, decoder="code_query")
    x = torch.randn(2, S, N, 2)
    with pytest.raises(ValueError, match="point_pos_enc.*positions"):
        m(x)
    with pytest.raises(ValueError, match="start_pos must be"):
        m(x, torch.zeros(2, N + 1, 2))
    sp = start_pos()
    out = m(x, sp)
    assert not torch.allclose(m(x, sp + 7.0)["z_bounded"], out["z_bounded"])  # the encoder sees positions
    # the decoder knows points by position, not by index: permuting the points' start
    # positions permutes the predictions (codes fixed)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    got = m.decode(out["quantized"], sp[:, perm])
    assert torch.allclose(got, out["logits"][:, :, perm], atol=1e-5)
    assert not hasattr(m, "point_emb")


def test_fourier_features_and_groups():
    phi = fourier_features(torch.tensor([[[0.0, 64.0]]]), 2)
    # coordinate 0 at 0: sin 0, 0 then cos 1, 1; coordinate 1 at half the frame: sin(pi), sin(2pi), cos -1, 1
    assert torch.allclose(phi[0, 0], torch.tensor([0, 0, 1, 1, 0, 0, -1, 1.0]), atol=1e-5)
    assert group_of_points(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="model.groups=5 must divide"):
        group_of_points(12, 5)


def test_groups_are_causal_per_step():
    m = tiny(groups=3)
    x = torch.randn(2, S, N, 2)
    y = x.clone()
    y[:, 3:] = torch.randn(2, S - 3, N, 2)
    a, b = m(x), m(y)
    assert torch.equal(a["codes"][:, :3 * 3], b["codes"][:, :3 * 3])
    assert torch.allclose(a["logits"][:, :3], b["logits"][:, :3], atol=1e-5)
    assert not torch.allclose(a["z_bounded"][:, 9:], b["z_bounded"][:, 9:])
    # a group's token sees the other groups of its own step
    z = x.clone()
    z[:, 0, -1] += 1.0  # a point of the last group moves at step 0
    assert not torch.allclose(m(z)["z_bounded"][:, 0], a["z_bounded"][:, 0])


def test_amplify_decoder_is_non_causal():
    m = tiny(decoder="amplify")
    q = m(torch.randn(2, S, N, 2))["quantized"]
    q2 = q.clone()
    q2[:, -1] = -q2[:, -1]
    assert not torch.allclose(m.decode(q)[:, 0], m.decode(q2)[:, 0], atol=1e-5)  # the future changes step 0


def test_model_kwargs_start_pos():
    pos = torch.rand(2, S + 1, N, 2)
    assert torch.equal(model_kwargs({"positions": pos})["start_pos"], pos[:, 0])
    assert model_kwargs({"velocities": pos}) == {}


def test_bad_switch_values_are_config_errors():
    from motion_data.common.errors import SettingError
    with pytest.raises(SettingError, match="model.decoder"):
        from_dict({}, ["model.decoder=mlp"])
    with pytest.raises(SettingError, match="model.groups"):
        from_dict({}, ["model.groups=0"])
    with pytest.raises(ValueError, match="model.groups"):
        tiny(groups=5)


def test_training_runs_with_the_switches_that_need_no_positions(tiny_build, tmp_path):
    from tokenizer_train.train.trainer import train

    sets = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=4",
            "training.epochs=1", "data.sampler.epoch_size=8", "training.log_interval=1",
            "model.decoder=code_query", "model.groups=2", "model.point_encoder.enabled=true",
            "training.code_entropy_weight=0.05"]
    last = train(from_dict({}, sets), tiny_build, tmp_path / "r", progress=False)
    assert np.isfinite(last["train/loss_epoch"]) and np.isfinite(last["val/loss_epoch"])
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/zero_code_frac_step" in r for r in rows)


@pytest.mark.parametrize("name", ["all_code_query", "all_amplify"])
def test_switches_under_bf16_autocast(name):
    m = tiny(**SWITCHES[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, S, N, 2), start_pos())
    assert out["logits"].shape == (2, S, N, W * W) and torch.isfinite(out["logits"].float()).all()
    assert out["z_bounded"].dtype == torch.float32
