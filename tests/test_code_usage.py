"""The LFQ / MAGVIT-v2 form of the code-usage regulariser and its running average (docs/DESIGN.md Trainer)."""
import math

import pytest
import torch

from tokenizer_train.evaluate.code_usage import (CodeUsageRegulariser, RunningCodeAverage, avg_tokens_for, code_usage_loss,
                                        soft_code_distribution, token_code_entropy)
from tokenizer_train.common.config import TrainingConfig
from tokenizer_train.model.fsq_geometry import fsq_levels_grid, fsq_prerounding

LEVELS = [8, 6, 5]
K = math.prod(LEVELS)


def _boundary_share(pre):
    """Share of channel values within 0.1 of a rounding boundary (a half-integer)."""
    frac = pre - pre.floor()
    return float(((frac - 0.5).abs() < 0.1).float().mean())


def test_token_entropy_is_the_entropy_of_the_joint_assignment():
    torch.manual_seed(0)
    pre = fsq_prerounding(torch.randn(7, 3), LEVELS)
    got = token_code_entropy(pre, LEVELS, 0.2)
    for i in range(7):
        p = soft_code_distribution(pre[i:i + 1], LEVELS, 0.2)  # one token: its own joint assignment
        assert float(got[i]) == pytest.approx(float(-(p * p.clamp_min(1e-30).log()).sum()), abs=1e-5)
    # a token exactly on a level is (nearly) certain, one on a boundary is not
    grid = torch.stack([g[1] for g in fsq_levels_grid(LEVELS)])[None]
    assert float(token_code_entropy(grid, LEVELS, 0.05)[0]) < 1e-3
    assert float(token_code_entropy(grid + 0.5, LEVELS, 0.05)[0]) > 3 * math.log(2) - 1e-3


def test_lfq_term_value_and_gradient():
    torch.manual_seed(1)
    z = torch.randn(40, 3, requires_grad=True)
    pre = fsq_prerounding(z, LEVELS)
    base, hn = code_usage_loss(pre, LEVELS, "entropy", 0.1)
    lfq, hn2 = code_usage_loss(pre, LEVELS, "entropy", 0.1, token_weight=0.5)
    own = token_code_entropy(pre, LEVELS, 0.1).mean()
    assert torch.equal(hn, hn2)
    lfq_v = float(lfq.detach())
    assert lfq_v == pytest.approx(float(base.detach()) + 0.5 * float(own.detach()) / math.log(K), abs=1e-6)
    kl, _ = code_usage_loss(pre, LEVELS, "kl_uniform", 0.1, token_weight=0.5)
    assert float(kl.detach()) == pytest.approx(math.log(K) - float(hn) * math.log(K) + 0.5 * float(own.detach()), abs=1e-5)
    lfq.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def _optimise(token_weight, running, M=24, steps=120):
    """Free tokens (M < K) driven by the term alone: the old form can only reach a spread
    average through ambiguous tokens."""
    torch.manual_seed(0)
    z = (torch.randn(M, 3) * 0.5).requires_grad_()
    opt = torch.optim.Adam([z], lr=0.05)
    ra = RunningCodeAverage(K, 4 * K) if running else None
    for _ in range(steps):
        term, _ = code_usage_loss(fsq_prerounding(z, LEVELS), LEVELS, "entropy", 0.1, token_weight=token_weight,
                                  running=ra)
        opt.zero_grad()
        term.backward()
        opt.step()
    return fsq_prerounding(z.detach(), LEVELS)


def test_own_entropy_term_moves_values_away_from_rounding_boundaries():
    start = _boundary_share(fsq_prerounding(torch.randn(24, 3, generator=torch.Generator().manual_seed(0)) * 0.5,
                                            LEVELS))
    old = _boundary_share(_optimise(0.0, running=False))
    new = _boundary_share(_optimise(1.0, running=False))
    new_running = _boundary_share(_optimise(1.0, running=True))
    assert old > 0.5  # the finding, reproduced: the old form breeds ambiguous tokens
    assert new < 0.5 * old and new_running < 0.5 * old
    assert new < start + 0.1  # and the new form does not


def test_running_average_is_a_window_over_more_tokens_than_a_batch():
    torch.manual_seed(2)
    ra = RunningCodeAverage(K, 100)
    batches = [fsq_prerounding(torch.randn(30, 3), LEVELS) for _ in range(3)]
    p0 = ra.mix(soft_code_distribution(batches[0], LEVELS, 0.1), 30.0)
    assert torch.equal(p0, soft_code_distribution(batches[0], LEVELS, 0.1))  # nothing before it
    z1 = batches[1].clone().requires_grad_()
    p1 = ra.mix(soft_code_distribution(z1, LEVELS, 0.1), 30.0)
    # a running mean while filling: exactly the distribution of all 60 tokens so far
    ref = soft_code_distribution(torch.cat(batches[:2]), LEVELS, 0.1)
    assert torch.allclose(p1, ref, atol=1e-6)
    p1.sum().backward()  # the batch's share keeps its gradient; the past is a constant
    assert z1.grad is not None
    ra.mix(soft_code_distribution(batches[2], LEVELS, 0.1), 30.0)
    assert ra.filled == 90.0
    ra.mix(soft_code_distribution(batches[2], LEVELS, 0.1), 30.0)
    assert ra.filled == 100.0  # full: from now on an exponential average over the window


def test_running_average_passes_the_batch_its_full_gradient():
    """The usage term's gradient must not shrink with the window (n / (past + n)): the batch
    gets the gradient of H at the estimate, at weight 1, like the per-token term."""
    ra = RunningCodeAverage(K, 4 * K)
    for _ in range(5):
        ra.mix(torch.softmax(torch.randn(K), 0), 30.0)
    pb = torch.softmax(torch.randn(K), 0).requires_grad_()
    past = ra.avg.clone()
    p = ra.mix(pb, 30.0)
    assert torch.allclose(p, (150 * past + 30 * pb.detach()) / 180, atol=1e-7)  # the value: the estimate
    w = torch.randn(K)
    (p * w).sum().backward()
    assert torch.allclose(pb.grad, w)  # d p / d p_batch = identity, not 30/180


def test_regulariser_uses_the_running_average_when_batch_tokens_are_fewer_than_k():
    tc = TrainingConfig(code_entropy_weight=0.1)
    assert avg_tokens_for(tc, K) == 4 * K
    reg = CodeUsageRegulariser(tc, LEVELS)
    torch.manual_seed(3)
    zs = [fsq_prerounding(torch.randn(4, 5, 3), LEVELS) for _ in range(6)]  # B*S = 20 < K = 240
    for z in zs:
        _, hn = reg(z)
    # the entropy is that of all 120 tokens, not of the last 20 (which cannot exceed log 20)
    all_tokens = torch.cat([z.reshape(-1, 3) for z in zs])
    _, ref = code_usage_loss(all_tokens, LEVELS, "entropy", 0.1)
    _, last = code_usage_loss(zs[-1].reshape(-1, 3), LEVELS, "entropy", 0.1)
    assert float(hn) == pytest.approx(float(ref), abs=1e-5)
    assert float(hn) > float(last) + 0.05
    # state round trip: a restored regulariser continues identically
    st = reg.state_dict()
    again = CodeUsageRegulariser(tc, LEVELS)
    again.load_state_dict(st)
    z = fsq_prerounding(torch.randn(20, 3), LEVELS)
    assert torch.equal(reg(z)[0], again(z)[0])
    # the batch alone (old behaviour) when asked for
    off = CodeUsageRegulariser(TrainingConfig(code_entropy_avg_tokens=0), LEVELS)
    assert off.running is None and off.state_dict() == {}
    with pytest.raises(ValueError, match="codes"):
        CodeUsageRegulariser(tc, [5, 5]).load_state_dict(st)
