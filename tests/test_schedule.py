"""LR warm-up + cosine/step decay and gradient clipping (stage 5)."""
import math

import pytest
import torch

from tokenizer_train.common.config import from_dict
from motion_data.common.errors import SettingError
from tokenizer_train.train.schedule import build_scheduler, clip_gradients, lr_factor

BASE = 1e-3


def lcfg(**kw):
    return from_dict({"training": {"lr_schedule": kw}}).training.lr_schedule


def lrs(cfg, total, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE)
    sched = build_scheduler(opt, cfg, total, BASE)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_default_is_constant_base_lr_exactly():
    assert lrs(lcfg(), 100, 50) == [BASE] * 50


def test_linear_warmup():
    got = lrs(lcfg(warmup_steps=4), 100, 6)
    assert got == pytest.approx([BASE * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)], rel=1e-12)


def test_cosine_curve():
    cfg = lcfg(type="cosine", warmup_steps=10, min_lr=1e-5)
    got = lrs(cfg, 110, 130)
    assert got[0] == pytest.approx(BASE / 10)
    assert got[9] == pytest.approx(BASE)
    assert got[10] == pytest.approx(BASE)  # decay starts from the top
    assert got[60] == pytest.approx((BASE + 1e-5) / 2)  # half way
    assert got[35] == pytest.approx(1e-5 + (BASE - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert got[110] == pytest.approx(1e-5) and got[129] == pytest.approx(1e-5)  # floor after the end
    assert all(a >= b for a, b in zip(got[10:], got[11:]))


def test_step_curve_with_floor():
    got = lrs(lcfg(type="step", warmup_steps=2, step_size=5, gamma=0.5, min_lr=2e-4), 100, 25)
    assert got[:2] == pytest.approx([BASE / 2, BASE])
    assert got[2:7] == pytest.approx([BASE] * 5)
    assert got[7:12] == pytest.approx([BASE / 2] * 5)
    assert got[12:17] == pytest.approx([BASE / 4] * 5)
    assert got[17:] == pytest.approx([2e-4] * 8)  # 1.25e-4 floored


def test_scheduler_state_resumes():
    cfg = lcfg(type="cosine", warmup_steps=3, min_lr=0.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE)
    s = build_scheduler(opt, cfg, 40, BASE)
    for _ in range(17):
        opt.step()
        s.step()
    state, lr_now = s.state_dict(), opt.param_groups[0]["lr"]
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    s2 = build_scheduler(opt2, cfg, 40, BASE)
    s2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = s2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == lr_now
    opt.step(); s.step(); opt2.step(); s2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(BASE * lr_factor(18, cfg, 40, BASE))


def test_bad_schedule_config():
    with pytest.raises(SettingError):
        lcfg(type="exponential")
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="step_size"):
        build_scheduler(torch.optim.SGD([p], lr=BASE), lcfg(type="step", step_size=0), 10, BASE)


def _model_with_grads(scale):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    (m(torch.randn(32, 8)).pow(2).sum() * scale).backward()
    return m


def test_clipping_bounds_the_norm():
    m = _model_with_grads(100.0)
    before = torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters()))
    assert before > 1.0
    pre = clip_gradients(m, 1.0)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters()))
    assert float(pre) == pytest.approx(float(before), rel=1e-5)
    assert float(after) <= 1.0 + 1e-5
    assert float(after) == pytest.approx(1.0, rel=1e-4)


def test_clipping_off_leaves_gradients_untouched():
    m = _model_with_grads(100.0)
    grads = [p.grad.clone() for p in m.parameters()]
    norm = clip_gradients(m, 0.0)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, m.parameters()))
    assert float(norm) == pytest.approx(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))), rel=1e-5)
    small = _model_with_grads(1e-4)  # below the bound: clipping changes nothing either
    g2 = [p.grad.clone() for p in small.parameters()]
    clip_gradients(small.parameters(), 10.0)
    assert all(torch.allclose(g, p.grad, rtol=1e-6) for g, p in zip(g2, small.parameters()))
