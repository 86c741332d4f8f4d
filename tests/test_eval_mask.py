"""The evaluation mask (docs/DESIGN.md, Trainer): valid AND the build's recorded filter, whatever
filter the run trains with."""
import shutil

import numpy as np
import pytest
import torch
import zarr

from motion_data.read.augment import AugmentConfig
from motion_data.common.labels import step_valid
from motion_data.read.batch import BatchRecipe, make_batch
from motion_data.build.folder import BuildDir
from motion_data.read.loader import LoaderOptions, make_loader
from motion_data.read.shard_reader import read_sample
from motion_data.common.static_filter import METRICS, DEFAULT_FILTER, StaticFilter, recorded_filter
from motion_data.build.stats import keep_mask

import pyarrow.parquet as pq

RECORDED = StaticFilter(True, "mean", 0.02, 5)  # not the seed's, so a default could not pass


def _with_filter(src, dst, bf: dict | None):
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst / "stats.zarr"), mode="r+")
    attrs = dict(g.attrs)
    if bf is None:
        attrs.pop("build_filter")
    else:
        attrs["build_filter"] = bf
    g.attrs.clear()
    g.attrs.update(attrs)
    return dst


def _expected_eval(root, cid, flt):
    m = pq.read_table(root / "manifest.parquet").to_pydict()
    i = m["clip_id"].index(cid)
    s = read_sample(root / m["shard"][i], m["offset"][i], m["size"][i], cid)
    valid = step_valid(s["vis"])
    keep = keep_mask(s["stats"][METRICS.index(flt.metric)][None], valid.sum(0, dtype=np.uint8)[None],
                     flt.threshold, flt.min_keep)[0]
    return keep[None] & valid


@pytest.mark.parametrize("train_filter", [StaticFilter(enable=False), StaticFilter(True, "p95", 0.04, 16),
                                          StaticFilter(True, "max", 0.5, 3)])
@pytest.mark.parametrize("workers", [0, 1])
def test_eval_mask_is_the_build_filter_whatever_the_training_filter(tiny_build, tmp_path, train_filter, workers):
    root = _with_filter(tiny_build, tmp_path / "b", {"metric": "mean", "threshold": 0.02, "min_keep": 5})
    assert BuildDir(root).build_filter == RECORDED
    aug = AugmentConfig(enabled=True, p=1.0)
    for split in ("val", "train"):
        ld = make_loader(root, LoaderOptions(batch_size=4, num_workers=workers), split=split,
                         static_filter=train_filter, augment=aug, val_split=0.3)
        ld.set_epoch(0)
        n = 0
        for b in ld:
            assert b["eval_mask"].dtype == torch.bool and b["eval_mask"].shape == b["mask"].shape
            for j, cid in enumerate(b["clip_id"]):
                np.testing.assert_array_equal(b["eval_mask"][j].numpy(), _expected_eval(root, cid, RECORDED))
                n += 1
            if train_filter.enable and train_filter != RECORDED:
                assert not torch.equal(b["mask"], b["eval_mask"])  # the two masks really differ here
        assert n > 0


def test_store_without_recorded_filter_uses_the_seed_filter(tiny_build, tmp_path):
    root = _with_filter(tiny_build, tmp_path / "b", None)
    assert BuildDir(root).build_filter == DEFAULT_FILTER
    assert recorded_filter({}) == DEFAULT_FILTER == StaticFilter(True, "p95", 0.04, 16)
    b = next(iter(make_loader(root, LoaderOptions(batch_size=4), split="all")))
    for j, cid in enumerate(b["clip_id"]):
        np.testing.assert_array_equal(b["eval_mask"][j].numpy(), _expected_eval(root, cid, DEFAULT_FILTER))


def test_make_batch_eval_mask_by_hand():
    # 1 clip, 3 frames (2 steps), 3 points; mean scores 0.5, 0.0, 0.1; point 2 invisible at frame 2
    pos = np.zeros((1, 3, 3, 2), np.float32)
    vis = np.array([[[True, True, True], [True, True, True], [True, True, False]]])
    valid = np.array([[[True, True, True], [True, True, False]]])
    st = np.zeros((1, 3, 3), np.float32)
    st[0, METRICS.index("mean")] = [0.5, 0.0, 0.1]
    b = make_batch(pos, vis, st, ["c"], BatchRecipe(StaticFilter(enable=False), 15,
                                                    eval_filter=StaticFilter(True, "mean", 0.05, 0)))
    assert torch.equal(b["mask"], torch.from_numpy(valid))  # filter off: the loss mask is valid
    assert b["eval_mask"].tolist() == [[[True, False, True], [True, False, False]]]


def test_streaming_mode_carries_the_eval_mask(tiny_build, tmp_path):
    from motion_data.read.sampler import SamplerConfig

    root = _with_filter(tiny_build, tmp_path / "b", {"metric": "mean", "threshold": 0.02, "min_keep": 5})
    ld = make_loader(root, LoaderOptions(batch_size=4), split="train", static_filter=StaticFilter(enable=False),
                     sampler=SamplerConfig(mode="streaming"), val_split=0.3)
    ld.set_epoch(0)
    b = next(iter(ld))
    assert torch.equal(b["mask"], b["valid"])  # trained unfiltered
    for j, cid in enumerate(b["clip_id"]):
        np.testing.assert_array_equal(b["eval_mask"][j].numpy(), _expected_eval(root, cid, RECORDED))


def test_make_batch_leaves_torchs_thread_count_alone():
    """The keep masks run a numba kernel whose OpenMP layer shares the process-wide thread
    count with torch: a trainer set to one thread must stay on one (bit-exact resume)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        make_batch(rng.random((4, 16, 16, 2), np.float32) * 30, np.ones((4, 16, 16), bool),
                   rng.random((4, 3, 16), np.float32), list("abcd"),
                   BatchRecipe(StaticFilter(True, "p95", 0.04, 2), 15))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
