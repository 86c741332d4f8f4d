"""The tokenizer model: shapes, causality, FSQ level sets, library indices, zero code."""
import numpy as np
import pytest
import torch

from tokenizer_train.common.config import ModelConfig
from tokenizer_train.evaluate.metrics import level_indices
from tokenizer_train.model.model import MotionTokenizer

S, N, W = 5, 6, 5


def tiny(levels=(8, 8, 6, 5), **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=32, num_layers=1, num_heads=4, max_steps=8, fsq_levels=list(levels), **kw)
    return MotionTokenizer(cfg, num_points=N, window_size=W).eval()


@pytest.mark.parametrize("levels", [(8, 8, 6, 5), (8, 8, 8, 4)])
def test_shapes_and_library_indices(levels):
    m = tiny(levels)
    x = torch.randn(3, S, N, 2) * 0.5
    out = m(x)
    assert out["logits"].shape == (3, S, N, W * W)
    assert out["codes"].shape == (3, S) and out["codes"].dtype == torch.int64
    assert out["z_bounded"].shape == (3, S, len(levels))
    assert out["quant_in"].shape == (3, S, len(levels))
    K = int(np.prod(levels))
    assert m.codebook_size == K
    assert 0 <= int(out["codes"].min()) and int(out["codes"].max()) < K
    # codes are FSQ's indices of the rounded bounded values (mixed radix, our metrics agree)
    grid_idx = torch.round(out["z_bounded"]).long() + torch.tensor([L // 2 for L in levels])
    assert (grid_idx >= 0).all()
    assert np.array_equal(level_indices(out["codes"].numpy(), list(levels)), grid_idx.numpy())
    assert torch.equal(m.fsq.codes_to_indices(out["quantized"]).long(), out["codes"])


def test_causal_codes_and_logits():
    m = tiny()
    x = torch.randn(2, S, N, 2) * 0.5
    y = x.clone()
    y[:, 3:] = torch.randn(2, S - 3, N, 2)
    a, b = m(x), m(y)
    assert torch.equal(a["codes"][:, :3], b["codes"][:, :3])
    assert torch.allclose(a["logits"][:, :3], b["logits"][:, :3], atol=1e-5)
    # and the future does change something (so the check above is not vacuous)
    assert not torch.allclose(a["z_bounded"][:, 3:], b["z_bounded"][:, 3:])


def test_every_point_and_step_gets_its_own_prediction():
    m = tiny()
    logits = m(torch.randn(1, S, N, 2))["logits"]
    assert not torch.allclose(logits[0, 0], logits[0, 1])  # not copied over time
    assert not torch.allclose(logits[0, :, 0], logits[0, :, 1])  # nor over points


def test_zero_codes_match_zero_input():
    m = tiny().train()
    z = m.zero_codes(S)
    assert z.shape == (S,)
    assert m.training  # mode restored
    m.eval()
    assert torch.equal(m(torch.zeros(2, S, N, 2))["codes"], z.expand(2, S))


def test_gradient_reaches_encoder_through_fsq():
    m = tiny().train()
    out = m(torch.randn(2, S, N, 2))
    out["logits"].logsumexp(-1).mean().backward()
    assert m.in_proj.weight.grad is not None and m.in_proj.weight.grad.abs().sum() > 0


def test_wrong_point_count_is_an_error():
    with pytest.raises(ValueError, match="points"):
        tiny()(torch.zeros(1, S, N + 1, 2))


def test_bf16_autocast_on_cpu():
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, S, N, 2))
    assert out["logits"].shape == (2, S, N, W * W)
    assert out["z_bounded"].dtype == torch.float32
