"""Property tests (hypothesis) not already in tests/test_stats.py: sampler weights and
draws, equal per-rank batch counts, labels for any odd W and both libraries, and the static
filter's nesting in min_keep and its dynamic ratio."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from motion_data.common import labels as L
from motion_data.build import stats as S
from motion_data.common import static_filter as SF
from motion_data.read.sampler import (SamplerConfig, SequentialBatchSampler, WeightedBatchSampler, clip_weights,
                                 systematic_draw)

ratios = hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(0, 1))
powers = st.just(0.0) | st.floats(0.1, 4.0)
floors = st.floats(1e-4, 1.0)


# ---------------------------------------------------------------- sampler weights


@settings(max_examples=150, deadline=None)
@given(r=ratios, power=powers, floor=floors)
def test_weights_positive_floored_and_monotone_in_r(r, power, floor):
    cfg = SamplerConfig(method="dynamic_ratio", power=power, min_weight=floor)
    w = clip_weights(r, cfg)
    assert w.shape == r.shape and np.isfinite(w).all()
    assert (w > 0).all()  # static clips still appear
    assert (w >= floor ** power * (1 - 1e-12)).all()  # the min_weight floor
    order = np.argsort(r, kind="stable")
    assert (np.diff(w[order]) >= 0).all()  # never less weight for more motion
    above = r > floor
    if power > 0 and above.sum() >= 2:  # strictly increasing above the floor
        ra, wa = r[above], w[above]
        i, j = np.argmin(ra), np.argmax(ra)
        if ra[j] > ra[i] * (1 + 1e-6):
            assert wa[j] > wa[i]
    # clips at or below the floor all weigh the same
    low = r <= floor
    if low.any():
        assert np.allclose(w[low], floor ** power)


@settings(max_examples=60, deadline=None)
@given(r=ratios, power=powers, floor=floors)
def test_uniform_weights_are_all_equal(r, power, floor):
    w = clip_weights(r, SamplerConfig(method="uniform", power=power, min_weight=floor))
    assert (w == w[0]).all() and w[0] > 0
    # and a constant ratio under dynamic_ratio is uniform too
    c = clip_weights(np.full_like(r, r[0]), SamplerConfig(method="dynamic_ratio", power=power, min_weight=floor))
    assert (c == c[0]).all()


@settings(max_examples=100, deadline=None)
@given(w=hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(1e-3, 10)), m=st.integers(1, 200),
       seed=st.integers(0, 2 ** 32 - 1))
def test_systematic_draw_counts_are_floor_or_ceil_of_the_expectation(w, m, seed):
    d = systematic_draw(w, m, np.random.default_rng(seed))
    assert len(d) == m and d.min() >= 0 and d.max() < len(w)
    exp = m * w / w.sum()
    c = np.bincount(d, minlength=len(w))
    eps = 1e-9 * m
    assert ((c >= np.floor(exp - eps)) & (c <= np.ceil(exp + eps))).all()


@settings(max_examples=60, deadline=None)
@given(n_clips=st.integers(1, 60), batch=st.integers(1, 8), world=st.integers(1, 4),
       epoch_size=st.none() | st.integers(1, 200), seed=st.integers(0, 1000), epoch=st.integers(0, 50))
def test_every_rank_gets_the_same_number_of_full_batches(n_clips, batch, world, epoch_size, seed, epoch):
    w = np.random.default_rng(seed).random(n_clips) + 0.01
    per = []
    for r in range(world):
        s = WeightedBatchSampler(np.arange(n_clips), w, batch, epoch_size, seed, r, world)
        s.set_epoch(epoch)
        per.append([list(b) for b in s])
    assert len({len(p) for p in per}) == 1 and len(per[0]) == len(s) >= 1
    assert all(len(b) == batch for p in per for b in p)
    # the ranks' batches are the slices of one global draw
    g = s.epoch_draw(epoch)
    assert [x for p in per for b in p for x in b] == g.ravel().tolist()


@settings(max_examples=60, deadline=None)
@given(n_rows=st.integers(1, 50), batch=st.integers(1, 8), world=st.integers(1, 4))
def test_validation_batches_cover_every_row_once_with_equal_counts(n_rows, batch, world):
    per = [list(SequentialBatchSampler(np.arange(n_rows), batch, r, world)) for r in range(world)]
    assert len({len(p) for p in per}) == 1
    assert sorted(x for p in per for b in p for x in b) == list(range(n_rows))


# ---------------------------------------------------------------- labels

odd_w = st.integers(1, 15).map(lambda k: 2 * k + 1)


@settings(max_examples=40, deadline=None)
@given(W=odd_w)
def test_class_centres_round_trip_and_rings_for_any_odd_window(W):
    off = L.class_offsets(W)
    np.testing.assert_array_equal(L.labels_from_px(off, W), np.arange(W * W))
    np.testing.assert_array_equal(L.labels_from_px(torch.from_numpy(off), W).numpy(), np.arange(W * W))
    # every point within half a pixel of a centre (not on the rounding edge) gets its class
    jitter = np.random.default_rng(W).uniform(-0.49, 0.49, off.shape).astype(np.float32)
    np.testing.assert_array_equal(L.labels_from_px(off + jitter, W), np.arange(W * W))
    r = L.ring_map(W)
    assert r[L.center_class(W)] == 0 and r.max() == W // 2
    np.testing.assert_array_equal(np.bincount(r), [1] + [8 * d for d in range(1, W // 2 + 1)])


@settings(max_examples=200, deadline=None)
@given(v=hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.just(2)),
                    elements=st.floats(-60, 60, width=32) | st.sampled_from([-7.5, -0.5, 0.5, 1.5, 2.5, 7.5])),
       W=odd_w)
def test_numpy_and_torch_labels_agree_and_stay_in_range(v, W):
    a = L.labels_from_px(v, W)
    b = L.labels_from_px(torch.from_numpy(v), W).numpy()
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < W * W)).all()
    # clamping: anything beyond the window lands on the border ring
    far = np.abs(v).max(axis=1) >= W // 2 + 0.5 + 1e-3
    assert (L.ring_map(W)[a[far]] == W // 2).all()
    n = L.normalize(v, W)
    assert (np.abs(n) <= 1).all()


# ---------------------------------------------------------------- static filter

scores_st = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 30)),
                       elements=st.floats(0, 0.5, width=32) | st.sampled_from([0.0, 0.04, 0.1]))


@settings(max_examples=80, deadline=None)
@given(scores=scores_st, thr=st.floats(1e-3, 0.6), k1=st.integers(0, 30), k2=st.integers(0, 30),
       seed=st.integers(0, 2 ** 16))
def test_kept_set_grows_with_min_keep(scores, thr, k1, k2, seed):
    k1, k2 = sorted((k1, k2))
    vc = np.random.default_rng(seed).integers(0, 3, size=scores.shape).astype(np.uint8)
    scores = np.where(vc > 0, scores, 0).astype(np.float32)  # no valid step: score 0
    a = S.keep_mask(scores, vc, thr, k1)
    b = S.keep_mask(scores, vc, thr, k2)
    assert not (a & ~b).any()


@settings(max_examples=80, deadline=None)
@given(scores=scores_st, thr=st.floats(0, 0.6), k=st.integers(0, 30), metric=st.sampled_from(SF.METRICS))
def test_dynamic_ratio_is_the_kept_share(scores, thr, k, metric):
    vc = np.ones(scores.shape, np.uint8)
    flt = SF.StaticFilter(True, metric, thr, k)
    r = S.dynamic_ratio(scores, vc, flt)
    keep = S.keep_mask(scores, vc, thr, k)
    np.testing.assert_allclose(r, keep.mean(1), rtol=1e-6)
    assert ((r >= 0) & (r <= 1)).all()
    assume(k <= scores.shape[1])
    assert (r >= k / scores.shape[1] - 1e-6).all()  # min_keep of N points, all valid
