"""Quantiser-input shaping before FSQ (stage 3)."""
import pytest
import torch
import torch.nn.functional as F

from tokenizer_train.common.config import from_dict
from motion_data.common.errors import SettingError
from tokenizer_train.model.shaping import QuantInputShaping


def mcfg(**model):
    return from_dict({"model": model}).model


def build(**model):
    m = mcfg(**model)
    return QuantInputShaping(m.hidden_dim, m.quant_input_norm, m.quant_input_tanh_scale, m.quant_input_noise_std)


def x_in(seed=0, d=128):
    return torch.randn(3, 5, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_all_off_is_exactly_identity():
    mod = build()
    assert mod.is_identity and not list(mod.parameters()) and mod.scale_value() is None
    x = x_in()
    for train in (True, False):
        mod.train(train)
        assert mod(x) is x


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms_over_last_dim(norm):
    mod = build(quant_input_norm=norm)
    x = x_in(1)
    y = mod(x)
    if norm == "layernorm":
        assert torch.allclose(y, F.layer_norm(x, (128,)), atol=1e-6)
        assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)
    else:
        assert torch.allclose(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps), atol=1e-5)
        assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)
    assert len(list(mod.parameters())) >= 1  # the affine part trains


def test_tanh_scale_bounds_and_clamps():
    mod = build(quant_input_tanh_scale={"enabled": True, "init": 1.5, "s_min": 0.5, "s_max": 3.0})
    x = x_in(2)
    y = mod(x)
    assert torch.equal(y, torch.tanh(torch.tensor(1.5) * x))
    assert y.abs().max() <= 1.0
    assert mod.scale_value() == pytest.approx(1.5)
    with torch.no_grad():
        mod.scale.fill_(10.0)
    assert mod.scale_value() == pytest.approx(3.0)
    assert torch.equal(mod(x), torch.tanh(torch.tensor(3.0) * x))
    with torch.no_grad():
        mod.scale.fill_(0.01)
    assert mod.scale_value() == pytest.approx(0.5)


def test_tanh_scale_trainable_switch():
    trainable = build(quant_input_tanh_scale={"enabled": True, "init": 1.0})
    x = x_in(3) * 0.2
    trainable(x).sum().backward()
    assert trainable.scale.grad is not None and trainable.scale.grad != 0
    frozen = build(quant_input_tanh_scale={"enabled": True, "init": 1.0, "trainable": False})
    assert not list(frozen.parameters())
    assert "scale" in frozen.state_dict()  # saved with checkpoints all the same
    assert torch.equal(frozen(x), trainable(x))
    with pytest.raises(SettingError):
        mcfg(quant_input_tanh_scale={"enabled": True, "init": 5.0, "s_max": 3.0})


def test_noise_only_in_training_mode():
    mod = build(quant_input_noise_std=0.05)
    x = x_in(4)
    mod.train()
    torch.manual_seed(0)
    a = mod(x)
    b = mod(x)
    assert not torch.equal(a, b)
    assert (a - x).std().item() == pytest.approx(0.05, rel=0.1)
    mod.eval()
    e1, e2 = mod(x), mod(x)
    assert torch.equal(e1, e2) and torch.equal(e1, x)


def test_order_norm_then_tanh_then_noise():
    mod = build(quant_input_norm="layernorm", quant_input_tanh_scale={"enabled": True, "init": 2.0},
                quant_input_noise_std=0.01)
    x = x_in(5)
    mod.eval()
    assert torch.allclose(mod(x), torch.tanh(2.0 * F.layer_norm(x, (128,))), atol=1e-6)
    assert "LayerNorm" in repr(mod)


def test_bad_norm_name():
    with pytest.raises(ValueError, match="quant_input_norm"):
        QuantInputShaping(8, "batchnorm", None, 0.0)
