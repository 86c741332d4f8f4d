import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from loader_fixtures import write_build
from motion_data.read.sampler import (SamplerConfig, SequentialBatchSampler, WeightedBatchSampler, clip_weights,
                                 epoch_rng, load_dynamic_ratio, systematic_draw)
from motion_data.common.errors import SettingError
from motion_data.common.static_filter import StaticFilter


def _chi2_upper(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_clip_weights_formula():
    r = np.array([0.0, 0.01, 0.2, 1.0])
    w = clip_weights(r, SamplerConfig(method="dynamic_ratio", power=2.0, min_weight=0.05))
    np.testing.assert_allclose(w, [0.05 ** 2, 0.05 ** 2, 0.04, 1.0])
    assert (clip_weights(r, SamplerConfig()) == 1).all()
    with pytest.raises(ValueError):
        SamplerConfig(method="bogus")


def test_chi_square_frequencies_match_weights():
    rng = np.random.default_rng(0)
    C = 60
    r = rng.random(C) ** 2
    w = clip_weights(r, SamplerConfig(method="dynamic_ratio", power=1.5, min_weight=0.05))
    s = WeightedBatchSampler(np.arange(C), w, batch_size=8, epoch_size=96, seed=3)
    counts = np.zeros(C)
    epochs = 400
    for e in range(epochs):
        s.set_epoch(e)
        for b in s:
            np.add.at(counts, b, 1)
    n = counts.sum()
    assert n == epochs * 96
    expected = n * w / w.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < _chi2_upper(C - 1)
    # the same test must reject wrong weights (it has power)
    wrong = n * np.ones(C) / C
    assert ((counts - wrong) ** 2 / wrong).sum() > _chi2_upper(C - 1)


def test_systematic_counts_are_floor_or_ceil():
    rng = np.random.default_rng(1)
    w = rng.random(37) + 0.01
    for m in (5, 37, 100):
        d = systematic_draw(w, m, rng)
        c = np.bincount(d, minlength=37)
        exp = m * w / w.sum()
        assert len(d) == m and ((c == np.floor(exp)) | (c == np.ceil(exp))).all()
    # uniform weights, m = number of clips: a plain permutation
    d = systematic_draw(np.ones(20), 20, rng)
    assert sorted(d.tolist()) == list(range(20))
    with pytest.raises(ValueError):
        systematic_draw(np.zeros(3), 3, rng)


def test_expected_dynamic_ratio_of_sampled_clips():
    rng = np.random.default_rng(2)
    C = 200
    r = rng.random(C) ** 3
    w = clip_weights(r, SamplerConfig(method="dynamic_ratio", power=1.0, min_weight=0.02))
    s = WeightedBatchSampler(np.arange(C), w, batch_size=16, epoch_size=160, seed=0)
    got = []
    for e in range(100):
        s.set_epoch(e)
        got.extend(r[i] for b in s for i in b)
    want = (w * r).sum() / w.sum()
    assert abs(np.mean(got) - want) < 0.01
    assert abs(np.mean(got) - r.mean()) > 0.05  # weighting really changed the mix


def test_deterministic_and_ranks_disjoint():
    C = 50
    w = np.linspace(0.1, 1, C)
    rows = np.arange(100, 100 + C)
    samplers = [WeightedBatchSampler(rows, w, 4, epoch_size=40, seed=7, rank=k, world_size=2) for k in range(2)]
    for s in samplers:
        s.set_epoch(5)
    a, b = [[x for bt in s for x in bt] for s in samplers]
    assert len(list(samplers[0])) == len(list(samplers[1])) == len(samplers[0]) == 5
    again = WeightedBatchSampler(rows, w, 4, epoch_size=40, seed=7, rank=0, world_size=2)
    again.set_epoch(5)
    assert [x for bt in again for x in bt] == a
    # the two ranks are disjoint slices of one global draw
    g = again.epoch_draw(5)
    assert g[0].ravel().tolist() == a and g[1].ravel().tolist() == b
    assert set(a) <= set(rows) and set(b) <= set(rows)
    # with uniform weights and epoch = all clips nothing repeats within or across ranks
    u = [WeightedBatchSampler(np.arange(48), np.ones(48), 4, seed=1, rank=k, world_size=2) for k in range(2)]
    ua, ub = [[x for bt in s for x in bt] for s in u]
    assert len(set(ua) | set(ub)) == 48
    s6 = WeightedBatchSampler(rows, w, 4, epoch_size=40, seed=7)
    s6.set_epoch(6)
    assert [x for bt in s6 for x in bt] != a


def test_resume_gives_identical_remaining_order():
    w = np.random.default_rng(0).random(30) + 0.1
    s = WeightedBatchSampler(np.arange(30), w, 3, seed=11)
    s.set_epoch(2)
    full = [list(b) for b in s]
    s.start_batch = 4
    state = s.state_dict()
    t = WeightedBatchSampler(np.arange(30), w, 3, seed=11)
    t.load_state_dict(state)
    assert [list(b) for b in t] == full[4:]
    with pytest.raises(ValueError):
        WeightedBatchSampler(np.arange(30), w, 3, seed=12).load_state_dict(state)


def test_sequential_val_sampler_covers_once_equal_batches():
    rows = np.arange(23)
    per = [list(SequentialBatchSampler(rows, 4, k, 3)) for k in range(3)]
    assert len({len(p) for p in per}) == 1
    flat = [x for p in per for b in p for x in b]
    assert sorted(flat) == rows.tolist()


def test_weights_from_store_match_build_filter(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(6, 6))
    m = pq.read_table(root / "manifest.parquet")
    r = load_dynamic_ratio(root, StaticFilter(enable=True, metric="p95", threshold=0.04, min_keep=16))
    np.testing.assert_allclose(r, m.column("dynamic_ratio").to_numpy())
    assert (load_dynamic_ratio(root, StaticFilter(enable=False)) == 1).all()
    stricter = load_dynamic_ratio(root, StaticFilter(enable=True, metric="p95", threshold=0.3, min_keep=2))
    assert (stricter <= r + 1e-6).all() and (stricter < r).any()
    assert epoch_rng(1, 2).random() == epoch_rng(1, 2).random()


@pytest.mark.parametrize("enable", [True, False])
def test_dynamic_ratio_weighs_by_the_filters_definition_with_the_filter_on_or_off(tmp_path, enable):
    """data.sampler.method dynamic_ratio never falls back to uniform weights in silence: with the
    static filter off for the loss, clips are still weighed by the share of points the
    configured metric, threshold and min_keep call dynamic."""
    from motion_data.read.sampler import sampling_weights

    root = write_build(tmp_path / "b", shard_sizes=(6, 6, 6), n_points=16)
    rows = np.arange(18)
    flt = StaticFilter(enable=enable, metric="p95", threshold=0.04, min_keep=2)
    cfg = SamplerConfig(method="dynamic_ratio", power=1.0, min_weight=0.01)
    w = sampling_weights(root, flt, cfg, rows)
    on = clip_weights(load_dynamic_ratio(root, StaticFilter(enable=True, metric="p95", threshold=0.04, min_keep=2)),
                      cfg)
    assert np.allclose(w, on) and w.std() > 0  # the clips' dynamic shares differ: not uniform
    assert (sampling_weights(root, flt, SamplerConfig(method="uniform"), rows) == 1).all()


def test_shard_affinity_keeps_the_draw_and_splits_the_shards_between_ranks():
    """The same multiset of clips and batch counts as without affinity; each rank reads about
    half of the shards in an epoch, and a window of batches touches only a few shards."""
    from motion_data.read.sampler import Affinity

    C, per_shard, bs, world = 4000, 50, 16, 2
    shard_of = np.arange(C) // per_shard  # 80 shards
    w = np.random.default_rng(3).random(C) + 0.2
    kw = dict(epoch_size=C, seed=9, world_size=world)
    plain = [WeightedBatchSampler(np.arange(C), w, bs, rank=k, **kw) for k in range(world)]
    grouped = [WeightedBatchSampler(np.arange(C), w, bs, rank=k, affinity=Affinity(shard_of, window=4), **kw)
               for k in range(world)]
    per_epoch = []
    for e in (0, 1):
        for s in plain + grouped:
            s.set_epoch(e)
        a = [[list(b) for b in s] for s in plain]
        g = [[list(b) for b in s] for s in grouped]
        assert [len(x) for x in a] == [len(x) for x in g] and all(len(b) == bs for x in g for b in x)
        assert sorted(sum(sum(a, []), [])) == sorted(sum(sum(g, []), []))  # the same multiset
        shards = [set(shard_of[sum(x, [])]) for x in g]
        assert all(len(s) <= 80 // world + 1 for s in shards)  # about 1/world of the shards each
        assert len(shards[0] & shards[1]) <= 1
        assert all(len(set(shard_of[sum(x, [])])) > 60 for x in a)  # without: nearly all shards per rank
        windows = [set(shard_of[sum(x[i:i + 4], [])]) for x in g for i in range(0, len(x), 4)]
        assert max(len(s) for s in windows) <= 3  # 64 draws of 50-clip shards: 2-3 shards
        batches = [set(shard_of[b]) for x in g for b in x]
        assert np.mean([len(s) for s in batches]) > 1  # the window is shuffled, not shard after shard
        per_epoch.append(shards[0])
    assert per_epoch[0] != per_epoch[1]  # a new shard permutation each epoch


def test_shard_affinity_needs_exact_mode():
    with pytest.raises(SettingError, match="shard_affinity"):
        SamplerConfig(shard_affinity=True, mode="streaming")
