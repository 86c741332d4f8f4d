"""numba kernels of motion_data/build/stats.py against plain numpy references, plus properties."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from motion_data.common import labels as L
from motion_data.common import label_kernels as LK
from conftest import class_histograms, point_stats
from motion_data.build import stats as S
from motion_data.common import static_filter as SF

W = 15
K = W * W


# ---------------------------------------------------------------- numpy references
def ref_labels_valid(pos, vis, rule, W=W):
    """Labels (the build's rule, labels.py) and valid steps of clips (C, T, N, 2) / (C, T, N)."""
    return L.labels_from_positions(pos, W, 128, rule), L.step_valid(vis)


def ref_point_stats(pos, vis, rule, W=W):
    lab, valid = ref_labels_valid(pos, vis, rule, W)
    C, T, N = valid.shape
    speed = np.linalg.norm(L.normalize(L.velocities(pos).astype(np.float64), W), axis=-1)
    out = {m: np.zeros((C, N), np.float64) for m in SF.METRICS}
    out["center_count"] = ((lab == L.center_class(W)) & valid).sum(axis=1)
    out["valid_count"] = valid.sum(axis=1)
    for c in range(C):
        for n in range(N):
            sp = speed[c, valid[c, :, n], n]
            if sp.size:
                out["mean"][c, n] = sp.mean()
                out["p95"][c, n] = np.quantile(sp, 0.95)
                out["max"][c, n] = sp.max()
    return out


def ref_keep_mask(scores, valid_count, threshold, min_keep):
    scores = scores.astype(np.float32)
    out = scores >= np.float32(threshold)
    for c in range(scores.shape[0]):
        if out[c].sum() < min_keep:
            cand = [n for n in range(scores.shape[1]) if valid_count[c, n] > 0]
            cand.sort(key=lambda n: (-float(scores[c, n]), n))
            out[c] = False
            out[c, cand[:min_keep]] = True
    return out


def ref_kept_class_counts(pos, vis, rule, keep, W=W):
    lab, valid = ref_labels_valid(pos, vis, rule, W)
    sel = valid & keep[:, None, :]
    return np.bincount(lab[sel], minlength=W * W), int(keep.sum())


def ref_class_histograms(pos, vis, rule, scores, valid_count, W=W):
    points = np.zeros((S.HIST_NBINS, W * W + 1), np.int64)
    topk = np.zeros((S.HIST_NBINS, S.HIST_RANK_MAX, W * W + 1), np.int64)
    lab, valid = ref_labels_valid(pos, vis, rule, W)
    # the bin of a score: the last float32 edge it reaches, by a linear scan
    edges = np.array([np.float32(k * S.HIST_BIN_WIDTH) for k in range(S.HIST_NBINS)], np.float32)
    for c in range(scores.shape[0]):
        cand = [n for n in range(scores.shape[1]) if valid_count[c, n] > 0]
        cand.sort(key=lambda n: (-float(scores[c, n]), n))
        rank = {n: r for r, n in enumerate(cand[: S.HIST_RANK_MAX])}
        for n in range(scores.shape[1]):
            b = int(np.nonzero(edges <= np.float32(scores[c, n]))[0].max())
            cnt = np.bincount(lab[c, valid[c, :, n], n], minlength=W * W)
            points[b, :-1] += cnt
            points[b, -1] += 1
            if n in rank:
                topk[b, rank[n], :-1] += cnt
                topk[b, rank[n], -1] += 1
    return points, topk


# ---------------------------------------------------------------- random data
def random_clips(rng, C=12, T=15, N=40, p_valid=0.8):
    """Positions (C, T+1, N, 2) and visibility (C, T+1, N): T steps per clip."""
    kind = rng.integers(0, 4, size=(C, 1, N, 1))
    scale = np.choose(kind, [0.05, 0.3, 2.0, 12.0])  # static / jitter / moving / clamped
    vel = (rng.standard_normal((C, T, N, 2)) * scale).astype(np.float32)
    # exact half-pixel steps exercise round-half-even in the velocity rule
    halves = rng.random((C, T, N, 2)) < 0.05
    vel[halves] = rng.integers(-4, 4, size=halves.sum()) + 0.5
    start = rng.uniform(-10, 138, (C, 1, N, 2))  # some start outside the frame: clamped by amplify
    pos = np.concatenate([start, start + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    # exact half-pixel positions exercise round-half-even in the amplify rule
    hp = rng.random(pos.shape) < 0.05
    pos[hp] = rng.integers(0, 128, size=hp.sum()) + 0.5
    vis = rng.random((C, T + 1, N)) < p_valid ** 0.5
    vis[:, :, :3] = False  # all-invisible points
    vis[0, :, 5:9] = False
    vis[1, :, :] = False  # an all-invisible clip
    vis[2, 2:, 10] = False  # a single valid step
    vis[2, :2, 10] = True
    return pos, vis


@pytest.fixture(scope="module", params=L.LABEL_RULES)
def data(request):
    rng = np.random.default_rng(0)
    pos, vis = random_clips(rng)
    return pos, vis, request.param, point_stats(pos, vis, W, 128, request.param)


# ---------------------------------------------------------------- kernels vs references
def test_point_stats_matches_numpy(data):
    pos, vis, rule, got = data
    ref = ref_point_stats(pos, vis, rule)
    for m in SF.METRICS:
        assert got[m].dtype == np.float32
        np.testing.assert_allclose(got[m], ref[m], atol=1e-5, rtol=1e-5, err_msg=m)
    np.testing.assert_array_equal(got["center_count"], ref["center_count"])
    np.testing.assert_array_equal(got["valid_count"], ref["valid_count"])
    # all-invisible points score 0 on every metric
    for m in SF.METRICS:
        assert (got[m][:, :3] == 0).all() and (got[m][1] == 0).all()


@pytest.mark.parametrize("rule", L.LABEL_RULES)
@pytest.mark.parametrize("steps", [1, 2, 21, 22, 40])
def test_point_stats_any_step_count(steps, rule):
    """Short clips take the two-largest p95 path, long ones (> 21 valid steps) the sort path."""
    rng = np.random.default_rng(steps)
    pos, vis = random_clips(rng, C=4, T=steps, N=30, p_valid=0.9)
    got, ref = point_stats(pos, vis, W, 128, rule), ref_point_stats(pos, vis, rule)
    for m in SF.METRICS:
        np.testing.assert_allclose(got[m], ref[m], atol=1e-5, rtol=1e-5, err_msg=m)
    np.testing.assert_array_equal(got["center_count"], ref["center_count"])


def test_shard_stats_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected pos"):
        S.shard_stats(np.zeros((2, 3, 4, 3)), np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="expected pos"):
        S.shard_stats(np.zeros((2, 3, 4, 2)), np.zeros((2, 3, 5), bool))
    with pytest.raises(ValueError, match="label rule"):
        S.shard_stats(np.zeros((2, 3, 4, 2)), np.zeros((2, 3, 4), bool), rule="rounded")


@pytest.mark.parametrize("metric", SF.METRICS)
@pytest.mark.parametrize("threshold,min_keep", [(0.0, 16), (0.04, 16), (0.1, 5), (0.3, 0), (0.05, 50), (9.0, 16)])
def test_keep_mask_matches_numpy(data, metric, threshold, min_keep):
    *_, st_ = data
    got = S.keep_mask(st_[metric], st_["valid_count"], threshold, min_keep)
    ref = ref_keep_mask(st_[metric], st_["valid_count"], threshold, min_keep)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(S.kept_counts(st_[metric], st_["valid_count"], threshold, min_keep), ref.sum(1))
    flt = SF.StaticFilter(enable=True, metric=metric, threshold=threshold, min_keep=min_keep)
    np.testing.assert_allclose(S.dynamic_ratio(st_[metric], st_["valid_count"], flt), ref.mean(1), rtol=1e-6)


def test_keep_mask_ties_prefer_lower_index():
    scores = np.array([[0.01, 0.02, 0.02, 0.02, 0.0]], np.float32)
    vc = np.array([[3, 3, 3, 3, 3]], np.uint8)
    np.testing.assert_array_equal(S.keep_mask(scores, vc, 0.5, 2), [[False, True, True, False, False]])
    # a point without a valid step is never kept by the min_keep rule
    vc[0, 1] = 0
    np.testing.assert_array_equal(S.keep_mask(scores, vc, 0.5, 2), [[False, False, True, True, False]])


def test_class_histograms_match_numpy(data):
    pos, vis, rule, st_ = data
    for m in SF.METRICS:
        points, topk = class_histograms(pos, vis, m, W, 128, rule)
        rp, rt = ref_class_histograms(pos, vis, rule, st_[m], st_["valid_count"])
        np.testing.assert_array_equal(points, rp)
        np.testing.assert_array_equal(topk, rt)
        assert points[:, -1].sum() == pos.shape[0] * pos.shape[2]


@pytest.mark.parametrize("rule", L.LABEL_RULES)
@pytest.mark.parametrize("steps", [15, 30])
def test_shard_stats_with_ties_and_many_points_matches_numpy(steps, rule):
    """Many exact score ties (all-zero and integer-step points) exercise the kernel's partial
    rank sort, and more points than HIST_RANK_MAX per clip its cut-off."""
    rng = np.random.default_rng(steps)
    pos, vis = random_clips(rng, C=9, T=steps, N=70)
    pos[:, :, 10:30] = pos[:, :1, 10:30]  # static: score 0, ties
    pos[:, :, 30:45] = np.round(pos[:, :, 30:45])  # repeated speeds
    st_, hists = S.shard_stats(pos, vis, W, 128, rule)
    ref = ref_point_stats(pos, vis, rule)
    assert st_["center_count"].dtype == st_["valid_count"].dtype == np.uint8
    for m in SF.METRICS:
        assert st_[m].dtype == np.float32
        np.testing.assert_allclose(st_[m], ref[m], atol=1e-5, rtol=1e-5, err_msg=m)
    np.testing.assert_array_equal(st_["center_count"], ref["center_count"])
    np.testing.assert_array_equal(st_["valid_count"], ref["valid_count"])
    assert list(hists) == list(SF.METRICS)
    for m in SF.METRICS:  # binned by the kernel's own scores, which equal the reference's above
        rp, rt = ref_class_histograms(pos, vis, rule, st_[m], st_["valid_count"])
        np.testing.assert_array_equal(hists[m][0], rp, err_msg=m)
        np.testing.assert_array_equal(hists[m][1], rt, err_msg=m)


@pytest.mark.parametrize("metric", SF.METRICS)
def test_filtered_counts_from_hist_exact_at_bin_edges(data, metric):
    pos, vis, rule, st_ = data
    points, topk = class_histograms(pos, vis, metric, W, 128, rule)
    for k in (0, 1, 16, S.HIST_RANK_MAX):
        for b in (0, 1, 4, 16, 37, 80, S.HIST_NBINS - 1):
            t = round(b * S.HIST_BIN_WIDTH, 10)
            keep = S.keep_mask(st_[metric], st_["valid_count"], t, k)
            ref_counts, ref_kept = ref_kept_class_counts(pos, vis, rule, keep)
            counts, kept = S.filtered_counts_from_hist(points, topk, t, k)
            np.testing.assert_array_equal(counts, ref_counts, err_msg=f"t={t} k={k}")
            assert kept == ref_kept


def test_filtered_counts_rejects_min_keep_above_ranks(data):
    pos, vis, rule, st_ = data
    points, topk = class_histograms(pos, vis, "p95", W, 128, rule)
    with pytest.raises(ValueError, match="--exact"):
        S.filtered_counts_from_hist(points, topk, 0.04, S.HIST_RANK_MAX + 1)


def test_bins_agree_with_float32_threshold_a_few_ulps_from_each_edge():
    """The histogram's 'dynamic' set equals keep_mask's ``score >= float32(t)`` at edges."""
    for b in range(1, S.HIST_NBINS):
        t = round(b * S.HIST_BIN_WIDTH, 10)
        edge = np.float32(t)
        near = [edge]
        lo = hi = edge
        for _ in range(4):
            lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(1))
            near += [lo, hi]
        near = np.array(near, np.float32)
        assert S.threshold_bin(t) == b
        np.testing.assert_array_equal(S.score_bin(near) >= b, near >= edge, err_msg=f"edge {t}")


def test_score_bin_is_the_last_float32_edge_reached():
    rng = np.random.default_rng(3)
    s = np.concatenate([rng.uniform(0, 0.6, 5000), S.HIST_EDGES, np.nextafter(S.HIST_EDGES, np.float32(-1)),
                        np.nextafter(S.HIST_EDGES, np.float32(1)), [0.0, 1.0, 1.4142135]]).astype(np.float32)
    ref = np.searchsorted(S.HIST_EDGES, s, side="right") - 1
    np.testing.assert_array_equal(S.score_bin(s), np.clip(ref, 0, S.HIST_NBINS - 1))


# ---------------------------------------------------------------- properties
scores_st = hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 24)),
                       elements=st.floats(0, 0.5, width=32) | st.sampled_from([0.0, 0.01, 0.04, 0.0425]))


@settings(max_examples=60, deadline=None)
@given(scores=scores_st, thr=st.floats(0, 0.6), k=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_min_keep_is_always_honoured(scores, thr, k, seed):
    vc = np.random.default_rng(seed).integers(0, 3, size=scores.shape).astype(np.uint8)
    scores = np.where(vc > 0, scores, 0).astype(np.float32)
    keep = S.keep_mask(scores, vc, thr, k)
    nv = (vc > 0).sum(1)
    dyn = scores >= np.float32(thr)
    kept = keep.sum(1)
    assert (kept >= np.minimum(k, nv)).all()
    for c in range(scores.shape[0]):
        if dyn[c].sum() >= k:
            np.testing.assert_array_equal(keep[c], dyn[c])
        else:
            assert kept[c] == min(k, nv[c])
            assert (vc[c][keep[c]] > 0).all()
            # kept points outscore every dropped point with a valid step
            dropped = ~keep[c] & (vc[c] > 0)
            if keep[c].any() and dropped.any():
                assert scores[c][keep[c]].min() >= scores[c][dropped].max()


@settings(max_examples=60, deadline=None)
@given(scores=scores_st, ts=st.lists(st.floats(0, 0.6), min_size=2, max_size=6), k=st.integers(0, 30))
def test_kept_count_monotone_in_threshold(scores, ts, k):
    vc = np.ones(scores.shape, np.uint8)
    ts = sorted(ts)
    counts = [S.kept_counts(scores, vc, t, k) for t in ts]
    for a, b in zip(counts, counts[1:]):
        assert (a >= b).all()
    # the kept sets are nested too (what makes the histogram answer monotone per class)
    masks = [S.keep_mask(scores, vc, t, k) for t in ts]
    for a, b in zip(masks, masks[1:]):
        assert not (b & ~a).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(0, S.HIST_RANK_MAX))
def test_hist_kept_count_monotone_in_threshold(seed, k):
    rng = np.random.default_rng(seed)
    pos, vis = random_clips(rng, C=3, T=4, N=20)
    points, topk = class_histograms(pos, vis, "max", W)
    kept = [S.filtered_counts_from_hist(points, topk, b * S.HIST_BIN_WIDTH, k)[1] for b in range(S.HIST_NBINS)]
    assert all(a >= b for a, b in zip(kept, kept[1:]))


def test_label_round_trip_of_class_centres():
    for w in (3, 5, 15):
        off = L.class_offsets(w)
        np.testing.assert_array_equal(L.labels_from_px(off, w), np.arange(w * w))
        # the numba label used by the kernels agrees
        assert [LK._label(float(x), float(y), w) for x, y in off] == list(range(w * w))
        np.testing.assert_array_equal(L.labels_from_norm(L.normalize(off, w), w), np.arange(w * w))
        assert L.center_class(w) == int(L.labels_from_px(np.zeros(2, np.float32), w))


@settings(max_examples=200, deadline=None)
@given(vx=st.floats(-40, 40, width=32) | st.sampled_from([-7.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.5]),
       vy=st.floats(-40, 40, width=32) | st.sampled_from([-6.5, -0.5, 0.5, 7.49]))
def test_labels_clamp_and_ring(vx, vy):
    v = np.array([vx, vy], np.float32)
    lab = int(L.labels_from_px(v, W))
    assert lab == LK._label(float(v[0]), float(v[1]), W)
    row, col = divmod(lab, W)
    c = W // 2
    assert col == min(max(int(np.rint(v[0])) + c, 0), W - 1)
    assert row == min(max(int(np.rint(v[1])) + c, 0), W - 1)
    ring = L.ring_map(W)[lab]
    assert ring == max(abs(row - c), abs(col - c))
    assert ring == min(max(abs(int(np.rint(v[0]))), abs(int(np.rint(v[1])))), c)
    if max(abs(vx), abs(vy)) > c + 0.5:
        assert ring == c  # clamped onto the border


def test_ring_map_shape_and_counts():
    r = L.ring_map(W)
    assert r.shape == (K,) and r.dtype == np.int64
    assert r[L.center_class(W)] == 0
    # ring d holds 8d classes
    np.testing.assert_array_equal(np.bincount(r), [1] + [8 * d for d in range(1, W // 2 + 1)])


# ---------------------------------------------------------------- the label rules
coord = st.floats(-20, 150, width=32) | st.sampled_from([-0.5, 0.5, 1.5, 63.5, 126.5, 127.0, 127.5])


@settings(max_examples=300, deadline=None)
@given(ax=coord, ay=coord, bx=coord, by=coord, rule=st.sampled_from(L.LABEL_RULES))
def test_numba_label_step_equals_labels_py(ax, ay, bx, by, rule):
    """The kernels' numba label (label_kernels._label_step) == labels.labels_from_positions, numpy
    and torch, for either rule, with clamping at the frame border and half-pixel ties."""
    import torch

    pos = np.array([[[ax, ay]], [[bx, by]]], np.float32)  # (T=2, N=1, 2)
    ref = int(L.labels_from_positions(pos, W, 128, rule)[0, 0])
    assert ref == int(L.labels_from_positions(torch.from_numpy(pos), W, 128, rule)[0, 0])
    v = pos[1, 0] - pos[0, 0]
    got = LK._label_step(pos[0, 0, 0], pos[0, 0, 1], pos[1, 0, 0], pos[1, 0, 1], v[0], v[1],
                         LK.label_spec(W, 128, rule))
    assert got == ref
    if rule == "amplify":  # docs/DESIGN.md: q = round(clip(p, 0, ref_size-1)), d = q[t+1] - q[t]
        q = np.rint(np.clip(pos[:, 0].astype(np.float64), 0, 127))
        d = q[1] - q[0]
        c = W // 2
        assert ref == int(np.clip(d[1] + c, 0, W - 1)) * W + int(np.clip(d[0] + c, 0, W - 1))


def test_amplify_rule_turns_steady_sub_pixel_motion_into_occasional_steps():
    """0.3 px a frame: always the centre under the velocity rule, a +1 step about every
    third frame under AMPLIFY's rule (docs/DESIGN.md)."""
    x = 10.1 + 0.3 * np.arange(16)
    pos = np.stack([x, np.full(16, 20.0)], -1)[:, None, :].astype(np.float32)  # (16, 1, 2)
    vel_lab = L.labels_from_positions(pos, W, 128, "velocity")[:, 0]
    amp_lab = L.labels_from_positions(pos, W, 128, "amplify")[:, 0]
    c = L.center_class(W)
    assert (vel_lab == c).all()
    assert set(amp_lab.tolist()) == {c, c + 1}
    assert (amp_lab == c + 1).sum() == int(np.rint(x[-1]) - np.rint(x[0]))
    vis = np.ones((1, 16, 1), bool)
    assert point_stats(pos[None], vis, W, 128, "velocity")["center_count"][0, 0] == 15
    assert point_stats(pos[None], vis, W, 128, "amplify")["center_count"][0, 0] == 15 - (amp_lab != c).sum()


def test_the_builds_shard_kernel_equals_the_vectorised_numpy_form_of_the_benchmark():
    """benchmarks/bench_stats.py times shard_stats against numpy_shard_stats: the same outputs."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_stats", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stats.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pos, vis = bench.make_chunk(np.random.default_rng(3), 40)
    ks, kh = S.shard_stats(pos, vis)
    ns, nh = bench.numpy_shard_stats(pos, vis)
    for m in SF.METRICS:
        assert np.allclose(ks[m], ns[m], atol=1e-6)
        assert np.array_equal(kh[m][0], nh[m][0]) and np.array_equal(kh[m][1], nh[m][1])
    assert np.array_equal(ks["center_count"], ns["center_count"])
