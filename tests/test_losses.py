"""Masked CE, class weighting (balanced, ring_decay) and focal loss (stage 2)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from motion_data.common.labels import center_class, labels_from_positions, ring_map, step_valid
from motion_data.common.static_filter import METRICS, StaticFilter
from conftest import class_histograms, point_stats
from motion_data.build.stats import keep_mask
from motion_data.build.store import store_attrs, write_store
from tokenizer_train.common.config import from_dict
from motion_data.common.errors import SettingError
from motion_data.build.folder import BuildDir
from tokenizer_train.train.class_weights import balanced_weights, class_weights_image, ring_decay_weights, save_class_weights
from tokenizer_train.train.losses import Criterion

W = 5
K = W * W


def tcfg(**training):
    return from_dict({"training": training}).training


def batch(seed=0, B=2, S=3, N=7, keep=0.6, center_share=0.5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, N, K, generator=g) * 2
    labels = torch.randint(0, K, (B, S, N), generator=g)
    labels[torch.rand(B, S, N, generator=g) < center_share] = center_class(W)
    mask = torch.rand(B, S, N, generator=g) < keep
    return logits, labels, mask


def counts_of(labels, mask):
    return np.bincount(labels[mask].numpy(), minlength=K)


def count_classes(batches, num_classes: int) -> np.ndarray:
    """Kept-label counts over loader-like batches (the library reads them from the build)."""
    return sum(np.bincount(b["labels"][b["mask"]].reshape(-1).numpy(), minlength=num_classes) for b in batches)


# ------------------------------------------------------------------ the baseline path
def test_all_off_is_masked_cross_entropy_exactly():
    for seed in range(5):
        logits, labels, mask = batch(seed)
        loss, info = Criterion(tcfg(), None, W)(logits, labels, mask)
        target = labels.masked_fill(~mask, -100).reshape(-1)
        ref = F.cross_entropy(logits.reshape(-1, K), target, ignore_index=-100)
        assert torch.equal(loss, ref)
        # the same number as CE over the selected entries (up to summation order)
        assert torch.allclose(loss, F.cross_entropy(logits[mask], labels[mask]), rtol=1e-6, atol=0)
        assert torch.equal(info["ce"], loss) and int(info["count"]) == int(mask.sum())


def test_present_but_off_equals_absent():
    logits, labels, mask = batch(1)
    base, _ = Criterion(tcfg(), None, W)(logits, labels, mask)
    counts = counts_of(labels, mask)
    off_cfgs = [
        tcfg(focal={"enabled": False, "gamma": 5.0, "alpha": 0.25}),
        tcfg(focal={"enabled": False, "gamma": 2.0, "alpha": "per_class"}),
        tcfg(class_weighting={"method": "none", "center_gamma": 0.1, "min_weight": 0.5, "power": 0.5}),
    ]
    for cfg in off_cfgs:
        loss, _ = Criterion(cfg, counts, W)(logits, labels, mask)
        assert torch.equal(loss, base)
        assert Criterion(cfg, counts, W).class_weights is None


def test_focal_gamma_zero_without_alpha_is_ce_exactly():
    logits, labels, mask = batch(2)
    base, _ = Criterion(tcfg(), None, W)(logits, labels, mask)
    focal, _ = Criterion(tcfg(focal={"enabled": True, "gamma": 0.0}), None, W)(logits, labels, mask)
    assert torch.equal(focal, base)


def test_empty_mask_gives_zero_loss_with_gradient():
    logits, labels, _ = batch(3)
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    counts = np.ones(K)
    for cfg in (tcfg(), tcfg(focal={"enabled": True, "gamma": 0.5}),
                tcfg(class_weighting={"method": "balanced"}, focal={"enabled": True, "gamma": 2.0, "alpha": "per_class"})):
        x = logits.clone().requires_grad_()
        loss, _ = Criterion(cfg, counts, W)(x, labels, mask)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


# ------------------------------------------------------------------------ focal loss
def test_focal_matches_reference_and_downweights_confident_entries():
    logits, labels, mask = batch(4)
    x = logits.clone().requires_grad_()
    loss, info = Criterion(tcfg(focal={"enabled": True, "gamma": 2.0}), None, W)(x, labels, mask)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0][mask]
    ref = (-(1 - logp.exp()) ** 2 * logp).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert float(loss.detach()) < float(info["ce"])
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # a scalar alpha scales it
    a, _ = Criterion(tcfg(focal={"enabled": True, "gamma": 2.0, "alpha": 0.25}), None, W)(logits, labels, mask)
    assert float(a) == pytest.approx(0.25 * float(loss.detach()), rel=1e-6)


def test_focal_gamma_below_one_has_finite_gradient_on_certain_entries():
    logits = torch.full((1, 1, 2, K), -50.0)
    logits[..., 0] = 50.0  # p(class 0) == 1 in float32
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    mask = torch.tensor([[[True, False]]])
    x = logits.requires_grad_()
    loss, _ = Criterion(tcfg(focal={"enabled": True, "gamma": 0.5}), None, W)(x, labels, mask)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_per_class_alpha_uses_the_class_weights_once():
    logits, labels, mask = batch(5)
    counts = counts_of(labels, mask)
    cw = {"method": "balanced", "power": 0.5}
    plain_w, _ = Criterion(tcfg(class_weighting=cw, focal={"enabled": True, "gamma": 1.0}), counts, W)(logits, labels, mask)
    per_cls, _ = Criterion(tcfg(class_weighting=cw, focal={"enabled": True, "gamma": 1.0, "alpha": "per_class"}),
                           counts, W)(logits, labels, mask)
    assert torch.equal(plain_w, per_cls)
    with pytest.raises(ValueError, match="per_class"):
        Criterion(tcfg(focal={"enabled": True, "alpha": "per_class"}), counts, W)
    with pytest.raises(SettingError):
        tcfg(focal={"enabled": True, "alpha": "per_klass"})


# ------------------------------------------------------------------ class weighting
def test_balanced_weights_definition():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 1000, K)
    counts[center_class(W)] = 20000
    counts[3] = 0  # unseen class
    freq = counts / counts.sum()
    for power in (1.0, 0.5):
        w = balanced_weights(counts, W, power=power)
        seen = counts > 0
        assert float((w * freq).sum()) == pytest.approx(1.0, rel=1e-5)  # mean 1 under the labels
        # w ∝ freq ** -power among seen classes
        ratio = w[seen] * freq[seen] ** power
        assert np.allclose(ratio, ratio[0], rtol=1e-5)
        assert w[3] == pytest.approx(w[seen].max())
        assert w[center_class(W)] == w.min()  # the most frequent class weighs least
    clipped = balanced_weights(counts, W, power=1.0, min_weight=0.2, max_weight=3.0)
    assert clipped.min() >= 0.2 - 1e-7 and clipped.max() <= 3.0 + 1e-6
    g = balanced_weights(counts, W, power=1.0, min_weight=0.2, max_weight=3.0, center_gamma=0.5)
    c = center_class(W)
    assert g[c] == pytest.approx(0.5 * clipped[c])
    assert np.array_equal(np.delete(g, c), np.delete(clipped, c))
    with pytest.raises(ValueError, match="all zero"):
        balanced_weights(np.zeros(K), W)
    with pytest.raises(ValueError, match="shape"):
        balanced_weights(np.ones(K + 1), W)


def test_ring_decay_weights_definition():
    rings = ring_map(W)
    counts = np.where(rings == 0, 500, 10).astype(np.int64)
    freq = counts / counts.sum()
    w = ring_decay_weights(counts, W, center_gamma=0.2, full_weight_ring=2)
    assert float((w * freq).sum()) == pytest.approx(1.0, rel=1e-5)
    per_ring = [np.unique(w[rings == r]) for r in range(rings.max() + 1)]
    assert all(len(u) == 1 for u in per_ring)  # a function of the ring only
    vals = np.array([u[0] for u in per_ring])
    assert np.all(np.diff(vals) >= 0)  # monotonic rise
    assert vals[0] / vals[2] == pytest.approx(0.2, rel=1e-5)  # centre = center_gamma * full
    assert vals[1] / vals[2] == pytest.approx(0.6, rel=1e-5)  # linear in between
    assert np.all(vals[2:] == vals[2])
    floor = ring_decay_weights(counts, W, center_gamma=0.01, full_weight_ring=2, min_weight=0.3)
    assert floor.min() >= 0.3 - 1e-7 and np.all(np.diff([floor[rings == r][0] for r in range(3)]) >= 0)


def test_weighted_criterion_matches_manual_sum():
    logits, labels, mask = batch(6)
    counts = counts_of(labels, mask) + 1
    crit = Criterion(tcfg(class_weighting={"method": "balanced", "max_weight": 4.0, "center_gamma": 0.5}), counts, W)
    loss, info = crit(logits, labels, mask)
    w = crit.class_weights.double()
    ce = F.cross_entropy(logits.double().reshape(-1, K), labels.reshape(-1), reduction="none").reshape(labels.shape)
    ref = (w[labels] * ce)[mask].sum() / mask.sum()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert float(info["ce"]) == pytest.approx(float(ce[mask].mean()), rel=1e-5)
    assert crit.class_weights.shape == (K,) and crit.class_weights.dtype == torch.float32


def test_balanced_weighting_raises_rare_class_gradient():
    logits, labels, mask = batch(7, center_share=0.8)
    counts = counts_of(labels, mask)
    c = center_class(W)
    grads = {}
    for name, cw in (("none", {"method": "none"}), ("balanced", {"method": "balanced"})):
        x = logits.clone().requires_grad_()
        Criterion(tcfg(class_weighting=cw), counts, W)(x, labels, mask)[0].backward()
        g = x.grad.norm(dim=-1)
        grads[name] = (g[mask & (labels == c)].sum(), g[mask & (labels != c)].sum())
    share = {k: float(v[1] / (v[0] + v[1])) for k, v in grads.items()}
    assert share["balanced"] > share["none"]


def test_runtime_counting():
    logits, labels, mask = batch(8)
    crit = Criterion(tcfg(class_weighting={"method": "balanced"}), None, W)
    assert crit.needs_counts and crit.class_weights is None
    with pytest.raises(RuntimeError, match="class counts"):
        crit(logits, labels, mask)
    halves = [{"labels": labels[:1], "mask": mask[:1]}, {"labels": labels[1:], "mask": mask[1:]}]
    crit = Criterion(tcfg(class_weighting={"method": "balanced"}), count_classes(halves, K), W)
    assert np.array_equal(crit.class_counts, counts_of(labels, mask))
    assert np.array_equal(count_classes(halves, K), counts_of(labels, mask))
    assert torch.equal(crit.class_weights, torch.from_numpy(balanced_weights(counts_of(labels, mask), W)))
    crit(logits, labels, mask)  # now usable
    other = Criterion(tcfg(class_weighting={"method": "balanced"}), counts_of(labels, mask), W)
    assert torch.equal(other.class_weights, crit.class_weights)
    # ring_decay needs no counts (normalised under uniform labels until it gets some)
    rd = Criterion(tcfg(class_weighting={"method": "ring_decay", "center_gamma": 0.3}), None, W)
    assert not rd.needs_counts and float(rd.class_weights.mean()) == pytest.approx(1.0, rel=1e-5)


def test_class_weights_artifacts(tmp_path):
    w = torch.from_numpy(np.arange(K, dtype=np.float32) + 1)
    npy, js = save_class_weights(tmp_path / "run" / "class_weights", w, W, meta={"method": "balanced"})
    arr = np.load(npy, allow_pickle=False)
    assert arr.shape == (W, W) and np.array_equal(arr.reshape(-1), w.numpy())
    doc = json.loads(js.read_text())
    assert doc["W"] == W and doc["method"] == "balanced" and np.array_equal(np.array(doc["weights"]), arr)
    img = class_weights_image(w, W)
    assert img.shape == (1, W, W) and img.max() == pytest.approx(1.0) and img.min() > 0
    assert not list((tmp_path / "run").glob(".*.tmp*"))


def test_class_counts_from_stats_match_direct_count(tmp_path):
    rng = np.random.default_rng(1)
    C, S, N = 4, 6, 30
    vel = rng.normal(size=(C, S, N, 2)) * rng.choice([0.1, 3.0], size=(C, 1, N, 1))
    pos = np.concatenate([np.full((C, 1, N, 2), 64.0), 64.0 + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    vis = rng.random((C, S + 1, N)) < 0.95
    valid = step_valid(vis)
    st = point_stats(pos, vis, W)
    hists = {m: class_histograms(pos, vis, m, W) for m in METRICS}
    write_store(tmp_path / "stats.zarr", st, hists,
                store_attrs(W=W, ref_size=128, T=S + 1, N=N, build_filter=StaticFilter(), n_clips=C,
                            label_rule="amplify"))
    for flt in (StaticFilter(enable=True, metric="p95", threshold=0.1, min_keep=4),
                StaticFilter(enable=True, metric="mean", threshold=0.05, min_keep=2),
                StaticFilter(enable=False)):
        got = BuildDir(tmp_path).class_counts(flt)
        if flt.enable:
            keep = keep_mask(st[flt.metric], st["valid_count"], flt.threshold, flt.min_keep)
        else:
            keep = np.ones((C, N), bool)
        sel = valid & keep[:, None, :]
        ref = np.bincount(labels_from_positions(pos, W)[sel], minlength=K)
        assert np.array_equal(got, ref)
    with pytest.raises(ValueError, match="stats.zarr"):  # no store there
        BuildDir(tmp_path / "elsewhere").class_counts(StaticFilter(enable=True, metric="max"))
