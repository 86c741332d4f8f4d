"""Class weights come from the training split only (issue 15, item 10): a build whose
validation clips move very differently from its training clips."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from motion_data.build.folder import BuildDir
from motion_data.common.labels import labels_from_positions, step_valid
from motion_data.read.split import split_manifest
from motion_data.common.static_filter import StaticFilter
from motion_data.build.stats import shard_stats
from motion_data.build.store import write_store
from tokenizer_train.train.class_weights import balanced_weights, training_class_counts
from tokenizer_train.common.config import from_dict
from tokenizer_train.train.trainer import train
from motion_data.read.clips import class_counts

sys.path.insert(0, str(Path(__file__).parent))
import loader_fixtures  # noqa: E402

SOURCES = [f"v/s{i}.h5" for i in range(6)]  # >= 5 sources: whole sources are held out
VAL_SPLIT = 0.25
W, T, N = 15, 16, 16


def _motion(val_rows, C, steps=T - 1, n_points=N, seed=0):
    """Training clips drift down 1 px/step (a few points), validation clips right 3 px/step (most)."""
    rng = np.random.default_rng(seed)
    vel = rng.normal(0, 0.02, (C, steps, n_points, 2)).astype(np.float32)
    for c in range(C):
        if c in val_rows:
            vel[c, :, : 12, 0] += 3.0
        else:
            vel[c, :, : int(rng.integers(2, 6)), 1] += 1.0
    start = rng.uniform(10, 60, (C, 1, n_points, 2))
    pos = np.concatenate([start, start + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    vis = rng.random((C, steps + 1, n_points)) > 0.05
    return pos, vis


def _ref_keep(scores, valid_count, flt):
    """numpy static filter (docs/DESIGN.md): score >= threshold, else the min_keep best with a valid step."""
    if not flt.enable:
        return np.ones(scores.shape, bool)
    keep = scores >= np.float32(flt.threshold)
    for c in range(len(scores)):
        if keep[c].sum() < flt.min_keep:
            cand = [n for n in range(scores.shape[1]) if valid_count[c, n] > 0]
            best = sorted(cand, key=lambda n: (-scores[c, n], n))[: flt.min_keep]
            keep[c] = False
            keep[c, best] = True
    return keep


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """(build folder, positions, visibility, train rows, val rows)."""
    probe = loader_fixtures.write_build(tmp_path_factory.mktemp("probe"), shard_sizes=(9, 9), sources=SOURCES)
    man = pq.read_table(probe / "manifest.parquet").to_pydict()
    train_rows, val_rows = split_manifest(man, VAL_SPLIT, T)
    C = len(man["clip_id"])
    pos, vis = _motion(set(val_rows.tolist()), C)
    mp = pytest.MonkeyPatch()
    mp.setattr(loader_fixtures, "synth_clips", lambda *a, **k: (pos, vis))
    try:
        build = loader_fixtures.write_build(tmp_path_factory.mktemp("skewed"), shard_sizes=(9, 9), sources=SOURCES)
    finally:
        mp.undo()
    # write_build has no class histograms: the store again, with them (as build-shards writes it)
    b = BuildDir(build)
    attrs = dict(b.attrs)
    st, hists = shard_stats(pos, vis, W, b.ref_size, b.label_rule)
    shutil.rmtree(b.store_path)
    write_store(b.store_path, st, hists, attrs)
    assert len(val_rows) > 0 and len(train_rows) > len(val_rows)
    return build, pos, vis, train_rows, val_rows


def _ref_counts(build, pos, vis, rows, flt):
    b = BuildDir(build)
    keep = _ref_keep(b.per_clip(flt.metric)[rows], b.per_clip("valid_count")[rows], flt)
    lab = labels_from_positions(pos[rows], W, b.ref_size, b.label_rule)
    m = step_valid(vis[rows]) & keep[:, None, :]
    return np.bincount(lab[m], minlength=W * W)


FILTERS = [StaticFilter(enable=False),
           StaticFilter(True, "p95", 0.04, 4),    # on a histogram bin edge: whole build minus validation
           StaticFilter(True, "p95", 0.041, 4),   # between edges: the training clips read directly
           StaticFilter(True, "max", 0.04, 40)]   # min_keep above the histograms' ranks: read directly


@pytest.mark.parametrize("flt", FILTERS, ids=str)
def test_class_counts_of_training_rows_equal_numpy(skewed, flt):
    build, pos, vis, train_rows, val_rows = skewed
    ref_train = _ref_counts(build, pos, vis, train_rows, flt)
    ref_val = _ref_counts(build, pos, vis, val_rows, flt)
    # the premise: validation labels are distributed very differently
    assert np.argmax(ref_train) != np.argmax(ref_val)
    got = class_counts(BuildDir(build), flt, rows=train_rows)
    assert got.dtype == np.int64 and np.array_equal(got, ref_train)
    assert np.array_equal(class_counts(BuildDir(build), flt, rows=val_rows), ref_val)
    if flt.min_keep <= 32:  # the histograms (every clip) hold both splits
        assert np.array_equal(BuildDir(build).class_counts(flt), ref_train + ref_val)


def test_trainer_weights_come_from_the_training_split(skewed, tmp_path):
    build, pos, vis, train_rows, val_rows = skewed
    flt = StaticFilter(True, "p95", 0.04, 4)
    cfg = from_dict({}, ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=6",
                         "training.epochs=1", f"data.val_split={VAL_SPLIT}", "training.device=cpu",
                         "data.static_filter.enable=true", "data.static_filter.threshold=0.04",
                         "data.static_filter.min_keep=4", "training.class_weighting.method=balanced"])
    assert np.array_equal(training_class_counts(BuildDir(build), cfg.data), _ref_counts(build, pos, vis, train_rows, flt))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, build, tmp_path / "run")
    finally:
        torch.set_num_threads(n)
    got = np.load(tmp_path / "run" / "class_weights.npy").reshape(-1)
    want = balanced_weights(_ref_counts(build, pos, vis, train_rows, flt), W)
    whole = balanced_weights(_ref_counts(build, pos, vis, np.arange(len(pos)), flt), W)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, whole, rtol=1e-3)
