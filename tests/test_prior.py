"""training.logit_adjustment: same gradients as weighted CE, calibrated logits, errors."""
import numpy as np
import pytest
import torch

from motion_data.common.labels import center_class
from tokenizer_train.train import prior
from tokenizer_train.common.config import from_dict
from tokenizer_train.train.losses import Criterion

W = 3  # 9 classes keep the optimisation tests instant


def _cfg(*sets):
    return from_dict({}, list(sets)).training


def _labels(n=3000, seed=0):
    """Labels with a dominant centre class (~70%) and a skewed tail."""
    g = np.random.default_rng(seed)
    p = np.full(W * W, 0.3 / (W * W - 1))
    p[center_class(W)] = 0.7
    p[0] *= 3
    p /= p.sum()
    return torch.from_numpy(g.choice(W * W, size=n, p=p)), p


def test_off_is_the_criterion_itself():
    c = Criterion(_cfg(), None, W)
    assert prior.wrap(c, _cfg()) is c


def test_loss_and_gradient_equal_weighted_ce_of_shifted_logits():
    labels, p = _labels(200)
    counts = np.bincount(labels.numpy(), minlength=W * W)
    tc = _cfg("training.class_weighting.method=balanced", "training.logit_adjustment=0.7")
    inner = Criterion(tc, counts, W)
    adj = prior.wrap(Criterion(tc, counts, W), tc)
    assert isinstance(adj, prior.LogitAdjusted)
    assert torch.equal(adj.class_weights, inner.class_weights)  # attributes pass through
    g = torch.randn(1, 200, 1, W * W, requires_grad=True)
    lab, mask = labels.view(1, 200, 1), torch.ones(1, 200, 1, dtype=torch.bool)
    la, _ = adj(g, lab, mask)
    (ga,) = torch.autograd.grad(la, g)
    h = (g.detach() + 0.7 * torch.log(inner.class_weights)).requires_grad_(True)
    lb, _ = inner(h, lab, mask)
    (gb,) = torch.autograd.grad(lb, h)
    assert torch.allclose(la, lb) and torch.allclose(ga, gb)


@pytest.mark.parametrize("method", ["balanced", "ring_decay"])
def test_tau_one_keeps_logits_calibrated(method):
    """A free logit vector fitted to labels drawn from p: weighted CE moves softmax towards
    w * p (the argmax leaves the centre); with tau = 1 it converges to p itself."""
    labels, p = _labels()
    counts = np.bincount(labels.numpy(), minlength=W * W)
    emp = counts / counts.sum()
    sets = [f"training.class_weighting.method={method}", "training.class_weighting.center_gamma=0.05"]

    def fit(tc):
        crit = prior.wrap(Criterion(tc, counts, W), tc)
        g = torch.zeros(W * W, requires_grad=True)
        opt = torch.optim.Adam([g], lr=0.1)
        lab, mask = labels.view(1, -1, 1), torch.ones(1, labels.numel(), 1, dtype=torch.bool)
        for _ in range(400):
            loss, _ = crit(g.expand(1, labels.numel(), 1, W * W), lab, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.softmax(g.detach(), 0).numpy()

    weighted = fit(_cfg(*sets))
    adjusted = fit(_cfg(*sets, "training.logit_adjustment=1.0"))
    assert np.abs(adjusted - emp).max() < 0.01
    assert np.abs(weighted - emp).max() > 0.1
    assert adjusted.argmax() == center_class(W) and weighted.argmax() != center_class(W)


def test_needs_class_weights():
    with pytest.raises(ValueError, match="class_weighting"):
        prior.wrap(Criterion(_cfg(), None, W), _cfg("training.logit_adjustment=1.0"))
    tc = _cfg("training.class_weighting.method=ring_decay", "training.class_weighting.center_gamma=0.0",
              "training.logit_adjustment=1.0")
    with pytest.raises(ValueError, match="> 0"):
        prior.wrap(Criterion(tc, None, W), tc)


def test_trains_end_to_end(tiny_build, tmp_path):
    from tokenizer_train.evaluate.check import read_metrics
    from tokenizer_train.train.trainer import train

    torch.set_num_threads(1)
    cfg = from_dict({}, ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=8",
                         "training.epochs=1", "training.log_interval=1", "training.device=cpu",
                         "training.class_weighting.method=balanced", "training.logit_adjustment=1.0"])
    train(cfg, tiny_build, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert any("val/acc_epoch" in r for r in rows)
    assert all(np.isfinite(r["train/loss_step"]) for r in rows if "train/loss_step" in r)
