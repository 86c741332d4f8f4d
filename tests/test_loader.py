import logging
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loader_fixtures import write_build
from motion_data.read.augment import AugmentConfig
from motion_data.common.labels import labels_from_positions, normalize, step_valid, velocities
from motion_data.common.label_kernels import label_spec
from motion_data.read.batch import ClipArrays, DerivedArrays, _batch_kernel, _derive_kernel, _label_kernel
from motion_data.common.workers import loader_worker_context
from motion_data.read.loader import ClipDataset, LoaderOptions, _identity, make_loader
from motion_data.read.ranges import FdCache
from motion_data.read.shard_reader import SampleRefs, read_batch, read_sample
from motion_data.read.sampler import IndexBatch, SamplerConfig, SequentialBatchSampler, load_dynamic_ratio
from motion_data.read.split import split_manifest
from motion_data.common.static_filter import StaticFilter
from motion_data.build.stats import keep_mask
from motion_data.common.errors import DataError

FLT = StaticFilter(enable=True, metric="p95", threshold=0.04, min_keep=16)
WEIGHTED = SamplerConfig(method="dynamic_ratio", power=1.0, min_weight=0.05)


def _manifest(root):
    return pq.read_table(root / "manifest.parquet").to_pydict()


def _reference(root, m, cid, flt):
    """Expected batch row of a clip, via the reference reader and the core functions."""
    i = m["clip_id"].index(cid)
    s = read_sample(root / m["shard"][i], m["offset"][i], m["size"][i], cid, m["checksum"][i])
    s["vel"], s["valid"] = velocities(s["pos"]), step_valid(s["vis"])
    st = s["stats"][["mean", "p95", "max"].index(flt.metric)][None]
    vc = s["valid"].sum(0, dtype=np.uint8)[None]
    keep = keep_mask(st, vc, flt.threshold, flt.min_keep)[0]
    return s, keep


def test_batch_contract_matches_reference(tiny_build):
    m = _manifest(tiny_build)
    ld = make_loader(tiny_build, LoaderOptions(batch_size=8, seed=1), split="all", static_filter=FLT, sampler=WEIGHTED)
    ld.set_epoch(0)
    batches = list(ld)
    assert len(batches) == len(ld) == 60 // 8
    b = batches[0]
    B, S, N = 8, 15, 100
    assert b["positions"].shape == (B, S + 1, N, 2) and b["positions"].dtype == torch.float32
    assert b["velocities"].shape == (B, S, N, 2) and b["velocities"].dtype == torch.float32
    assert b["labels"].shape == (B, S, N) and b["labels"].dtype == torch.int64
    assert b["mask"].dtype == torch.bool and b["valid"].dtype == torch.bool and b["mask"].shape == (B, S, N)
    assert b["dynamic_ratio"].shape == (B,) and b["dynamic_ratio"].dtype == torch.float32
    assert len(b["clip_id"]) == B
    ratio = load_dynamic_ratio(tiny_build, FLT)
    for batch in batches[:3]:
        for j, cid in enumerate(batch["clip_id"]):
            s, keep = _reference(tiny_build, m, cid, FLT)
            np.testing.assert_array_equal(batch["positions"][j].numpy(), s["pos"])
            np.testing.assert_array_equal(batch["velocities"][j].numpy(), normalize(s["vel"]))
            np.testing.assert_array_equal(batch["labels"][j].numpy(), labels_from_positions(s["pos"]))
            np.testing.assert_array_equal(batch["valid"][j].numpy(), s["valid"])
            np.testing.assert_array_equal(batch["mask"][j].numpy(), keep[None] & s["valid"])
            assert batch["dynamic_ratio"][j] == pytest.approx(ratio[m["clip_id"].index(cid)])
    # filter off: mask == valid, ratio 1
    b0 = next(iter(make_loader(tiny_build, LoaderOptions(batch_size=4), split="all",
                               static_filter=StaticFilter(enable=False))))
    assert torch.equal(b0["mask"], b0["valid"]) and (b0["dynamic_ratio"] == 1).all()


@pytest.mark.parametrize("rule", ["amplify", "velocity"])
def test_kernel_matches_label_functions(rule):
    rng = np.random.default_rng(0)
    v = (rng.normal(0, 4, (3, 15, 50, 2))).astype(np.float32)
    v[0, 0, :8, 0] = [0.5, 1.5, -0.5, 2.5, -7.5, 7.5, 100, -100]  # half-way cases and saturation
    start = rng.uniform(-5, 133, (3, 1, 50, 2))  # some outside the frame: clamped by amplify
    pos = np.concatenate([start, start + np.cumsum(v, axis=1)], axis=1).astype(np.float32)
    pos[1, :, :5] = np.array([63.5, 64.5], np.float32)  # half-pixel positions (round half to even)
    pos[1, 3::2, :5] += np.float32(1.0)
    pos[2, 4:7, :4] = np.array([[1e30, -1e30], [3e9, -3e9], [np.float32(127.5), -0.5], [128.5, 126.5]],
                               np.float32)[None]  # far outside the frame: clamped before the int conversion
    vis = rng.random((3, 16, 50)) < 0.9
    keep = rng.random((3, 50)) < 0.5
    keep_eval = rng.random((3, 50)) < 0.5
    valid = step_valid(vis)
    vo, lo, mo, va, eo = (np.empty((3, 15, 50, 2), np.float32), np.empty(valid.shape, np.int64), np.empty_like(valid),
                          np.empty_like(valid), np.empty_like(valid))
    clips, spec = ClipArrays(pos, vis, keep, keep_eval), label_spec(15, 128, rule)
    _batch_kernel(clips, spec, lo, DerivedArrays(vo, mo, va, eo))
    np.testing.assert_array_equal(vo, normalize(velocities(pos)))
    np.testing.assert_array_equal(lo, labels_from_positions(pos, 15, 128, rule))
    np.testing.assert_array_equal(va, valid)
    np.testing.assert_array_equal(mo, keep[:, None] & valid)
    np.testing.assert_array_equal(eo, keep_eval[:, None] & valid)
    # a worker's labels-only pass, and the main process's pass over a worker's batch
    narrow = np.empty(valid.shape, np.uint8)
    _label_kernel(pos, spec, narrow)
    np.testing.assert_array_equal(narrow, labels_from_positions(pos, 15, 128, rule))
    outs = [np.zeros_like(x) for x in (vo, lo, mo, va, eo)]
    _derive_kernel(clips, narrow, 15, outs[1], DerivedArrays(outs[0], *outs[2:]))
    for got, want in zip(outs, (vo, lo, mo, va, eo)):
        np.testing.assert_array_equal(got, want)


def test_batch_reader_equals_single_sample_reader(tiny_build):
    m = _manifest(tiny_build)
    fds = FdCache(2)
    for i in range(0, 60, 7):
        refs = SampleRefs([str(tiny_build / m["shard"][i])], [m["offset"][i]], [m["size"][i]], [m["clip_id"][i]],
                          [m["checksum"][i]])
        pos, vis, st, ok, err = read_batch(fds, refs, 16, 100)
        assert ok.all() and err == [None]
        ref = read_sample(tiny_build / m["shard"][i], m["offset"][i], m["size"][i], m["clip_id"][i])
        for a, k in zip((pos[0], vis[0], st[0]), ("pos", "vis", "stats")):
            np.testing.assert_array_equal(a, ref[k])
        assert ref["checksum"] == m["checksum"][i] and ref["key"] == m["clip_id"][i]
    assert len(fds) <= 2


def test_batch_reader_equals_reference_and_names_the_unusual(tiny_build, tmp_path):
    m = _manifest(tiny_build)
    ds = make_loader(tiny_build, LoaderOptions(batch_size=4), split="all").dataset
    rows = list(range(59, -1, -3))  # not in file order
    B = len(rows)
    pos, vis, st, ok, err = ds.read_rows(rows)
    assert ok.all()
    for j, r in enumerate(rows):
        ref = read_sample(tiny_build / m["shard"][r], m["offset"][r], m["size"][r], m["clip_id"][r])
        for a, k in zip((pos, vis, st), ("pos", "vis", "stats")):
            np.testing.assert_array_equal(a[j], ref[k])
    # a member header with a wrong checksum, or a sample read under another key: refused,
    # each by a message naming its shard; the other rows are read
    root, _ = _corrupt(tiny_build, tmp_path, "none")
    i = rows[2]
    shard = root / m["shard"][i]
    data = bytearray(shard.read_bytes())
    data[m["offset"][i] + 100] ^= 1  # inside the mode field of the first member header
    shard.write_bytes(data)
    ds = make_loader(root, LoaderOptions(batch_size=4), split="all").dataset
    ds.clip_id[rows[5]] = ds.clip_id[rows[5]][:-1] + "x"
    pos, vis, st, got, err = ds.read_rows(rows)
    assert not got[2] and not got[5] and got.sum() == B - 2
    assert "corrupt tar header" in err[2] and m["shard"][i] in err[2]
    assert "does not belong to sample" in err[5] and m["shard"][rows[5]] in err[5]


def test_val_loader_full_deterministic_pass(tiny_build):
    m = _manifest(tiny_build)
    _, val_rows = split_manifest(m, 0.2, 16)
    aug = AugmentConfig(enabled=True, jitter_std=0.1, p=1.0)
    kw = dict(split="val", static_filter=FLT, sampler=WEIGHTED, augment=aug, val_split=0.2)
    opts = LoaderOptions(batch_size=3)
    ids = [[c for b in make_loader(tiny_build, opts, **kw) for c in b["clip_id"]] for _ in range(2)]
    assert ids[0] == ids[1] == [m["clip_id"][r] for r in val_rows]
    b = next(iter(make_loader(tiny_build, opts, **kw)))
    s, _ = _reference(tiny_build, m, b["clip_id"][0], FLT)
    np.testing.assert_array_equal(b["velocities"][0].numpy(), normalize(s["vel"]))  # no augmentation
    # two ranks: same batch count, disjoint, together everything
    per = [list(make_loader(tiny_build, replace(opts, rank=k, world_size=2), **kw)) for k in range(2)]
    assert len(per[0]) == len(per[1])
    got = [c for p in per for b in p for c in b["clip_id"]]
    assert sorted(got) == sorted(m["clip_id"][r] for r in val_rows)
    # train and val never share a clip
    train = {c for b in make_loader(tiny_build, LoaderOptions(batch_size=4, epoch_size=400), split="train",
                                    val_split=0.2, sampler=SamplerConfig()) for c in b["clip_id"]}
    assert train.isdisjoint(got)


def _run(ld, epoch, n=None):
    ld.set_epoch(epoch)
    out = []
    for b in ld:
        out.append((b["clip_id"], b["velocities"].clone(), b["labels"].clone()))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_identical_remaining(tiny_build, workers):
    aug = AugmentConfig(enabled=True, scale_range=[0.8, 1.25], jitter_std=0.02, p=0.5)
    kw = dict(split="train", static_filter=FLT, sampler=WEIGHTED, augment=aug, val_split=0.1)
    opts = LoaderOptions(batch_size=4, seed=5, num_workers=workers, epoch_size=40)
    full = _run(make_loader(tiny_build, opts, **kw), epoch=3)
    assert len(full) == 10
    first = make_loader(tiny_build, opts, **kw)
    head = _run(first, epoch=3, n=4)
    state = first.state_dict()
    assert state["batches_done"] == 4
    second = make_loader(tiny_build, opts, **kw)
    second.load_state_dict(state)
    rest = _run(second, epoch=3)
    assert len(head) + len(rest) == len(full)
    for (a_id, a_v, a_l), (b_id, b_v, b_l) in zip(head + rest, full):
        assert a_id == b_id and torch.equal(a_v, b_v) and torch.equal(a_l, b_l)
    # the next epoch starts from batch 0 again and differs; iterating on without
    # set_epoch moves to the epoch after
    nxt = _run(second, epoch=4)
    assert len(nxt) == 10 and [x[0] for x in nxt] != [x[0] for x in full]
    after = [b["clip_id"] for b in second]
    assert second.epoch == 5 and after == [x[0] for x in _run(make_loader(tiny_build, opts, **kw), epoch=5)]


def test_augmentation_seeded_by_batch_place(tiny_build):
    aug = AugmentConfig(enabled=True, jitter_std=0.05, p=1.0)
    ds = make_loader(tiny_build, LoaderOptions(batch_size=4, seed=9), split="all", static_filter=FLT,
                     augment=aug).dataset
    a = ds.__getitems__(IndexBatch([0, 1], (2, 0, 0)))["velocities"]
    assert torch.equal(a, ds.__getitems__(IndexBatch([0, 1], (2, 0, 0)))["velocities"])
    assert not torch.equal(a, ds.__getitems__(IndexBatch([0, 1], (2, 0, 1)))["velocities"])
    assert not torch.equal(a, ds.__getitems__(IndexBatch([0, 1], (3, 0, 0)))["velocities"])


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_workers_deliver_exactly_the_draw(tiny_build):
    kw = dict(split="all", static_filter=FLT, sampler=WEIGHTED)
    opts = LoaderOptions(batch_size=5, seed=2, epoch_size=60)
    ld = make_loader(tiny_build, replace(opts, num_workers=2), **kw)
    # batches come through the shared slots, 4 per worker: 12 batches reuse them, and the
    # batches kept below must still equal the in-process ones
    assert ld.dataset.ring is not None and ld.dataset.ring.per_worker == 4
    ld.set_epoch(1)
    got = Counter(c for b in ld for c in b["clip_id"])
    m = _manifest(tiny_build)
    draw = ld.batch_sampler.epoch_draw(1)[0].ravel()
    assert got == Counter(m["clip_id"][r] for r in draw)
    assert sum(got.values()) == 60
    # a worker's packed batch (one shared buffer, narrow labels) unpacks to exactly the
    # in-process batch: same values, contract dtypes
    inproc = make_loader(tiny_build, opts, **kw)
    for a, b in zip(_batches(ld, 2), _batches(inproc, 2)):
        assert a.keys() == b.keys() and a["clip_id"] == b["clip_id"]
        for k in ("positions", "velocities", "labels", "mask", "valid", "dynamic_ratio"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert b["labels"].dtype == torch.int64
    # a DataLoader of its own over a ClipDataset (as tokenize builds one) gets contract
    # dicts from its workers too
    ds = ClipDataset(tiny_build, _manifest(tiny_build), FLT)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=SequentialBatchSampler(np.arange(10), 5),
                                     collate_fn=_identity, num_workers=1, multiprocessing_context=loader_worker_context("motion_data.read.loader"))
    own = list(dl)
    assert [len(x["clip_id"]) for x in own] == [5, 5] and own[0]["labels"].dtype == torch.int64
    # persistent workers + pinned memory keep working across epochs
    ld = make_loader(tiny_build, replace(opts, num_workers=2, persistent_workers=True, pin_memory=True), **kw)
    counts = [len(_run(ld, e)) for e in range(2)]
    assert counts == [len(ld)] * 2


def _batches(ld, epoch):
    ld.set_epoch(epoch)
    return list(ld)


def test_iterating_leaves_global_torch_rng_alone(tiny_build):
    """The workers' base seed comes from the loader's own generator (seed, epoch, rank), so
    starting or resuming an epoch does not shift the trainer's dropout/noise stream."""
    ld = make_loader(tiny_build, LoaderOptions(batch_size=4, seed=3), split="all", static_filter=FLT)
    torch.manual_seed(0)
    ref = torch.rand(4)
    torch.manual_seed(0)
    ld.set_epoch(0)
    next(iter(ld))
    ld.load_state_dict({"epoch": 0, "batches_done": 1})
    next(iter(ld))
    assert torch.equal(torch.rand(4), ref)
    seeds = []
    for e in (0, 1, 0):
        ld.set_epoch(e)
        next(iter(ld))
        seeds.append(ld.generator.initial_seed())
    assert seeds[0] == seeds[2] != seeds[1]


def _corrupt(src, tmp_path, how):
    root = tmp_path / "b"
    shutil.copytree(src, root)
    m = _manifest(root)
    shard = root / m["shard"][-1]
    data = bytearray(shard.read_bytes())
    if how == "none":
        pass
    elif how == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        i = len(m["shard"]) - 1
        off = m["offset"][i]
        data[off:off + 512] = b"\xff" * 512  # garbage over the last sample's first header
        shard.write_bytes(data)
    return root, m["shard"][-1]


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_corrupt_shard_fails_naming_it_or_is_skipped(tmp_path, how, caplog):
    src = write_build(tmp_path / "src", shard_sizes=(5, 3, 4))
    root, bad = _corrupt(src, tmp_path, how)
    kw = dict(split="all", static_filter=FLT, sampler=SamplerConfig())
    opts = LoaderOptions(batch_size=4, epoch_size=12)
    with pytest.raises(DataError, match=bad.split("/")[-1]):
        for _ in make_loader(root, opts, **kw):
            pass
    ld = make_loader(root, replace(opts, on_error="skip"), **kw)
    with caplog.at_level(logging.WARNING, logger="motion_data.read.loader"):
        n = sum(len(b["clip_id"]) for b in ld)
    lost = 2 if how == "truncate" else 1  # the second half of a 4-clip shard / one sample
    assert ld.skipped == lost and n == 12 - lost
    assert sum("skipped unreadable sample" in r.message and bad.split("/")[-1] in r.message
               for r in caplog.records) == lost
    assert ld.state_dict()["skipped"] == lost


def test_missing_shard_is_named(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(3, 3))
    (root / "shards" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="shard-000001.tar"):
        for _ in make_loader(root, LoaderOptions(batch_size=6, epoch_size=6), split="all"):
            pass


def test_streaming_mode_frequencies_follow_weights(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(6, 2, 4), n_points=16)
    flt = StaticFilter(enable=True, metric="p95", threshold=0.1, min_keep=2)
    cfg = SamplerConfig(method="dynamic_ratio", power=2.0, min_weight=0.1, mode="streaming")
    ld = make_loader(root, LoaderOptions(batch_size=8, epoch_size=8 * 600, shuffle_buffer=50, seed=3), split="all",
                     static_filter=flt, sampler=cfg)
    assert len(ld) == 600
    ld.set_epoch(0)
    seen = Counter()
    n_batches = 0
    for b in ld:
        n_batches += 1
        assert b["velocities"].shape == (8, 15, 16, 2)
        seen.update(b["clip_id"])
    assert n_batches == 600
    m = _manifest(root)
    r = load_dynamic_ratio(root, flt)
    w = np.maximum(0.1, r) ** 2.0
    freq = np.array([seen[c] for c in m["clip_id"]]) / sum(seen.values())
    np.testing.assert_allclose(freq, w / w.sum(), rtol=0.15, atol=0.004)
    assert np.corrcoef(freq, w)[0, 1] > 0.97


def test_streaming_skips_corrupt_shard(tmp_path):
    src = write_build(tmp_path / "src", shard_sizes=(4, 4, 4))
    root, bad = _corrupt(src, tmp_path, "truncate")
    cfg = SamplerConfig(mode="streaming")
    ld = make_loader(root, LoaderOptions(batch_size=4, epoch_size=40, on_error="skip"), split="all", sampler=cfg)
    assert sum(1 for _ in ld) == 10
    assert ld.skipped > 0 and any(bad.split("/")[-1] in msg for msg in ld.skipped_messages)
    ld = make_loader(root, LoaderOptions(batch_size=4, epoch_size=400), split="all", sampler=cfg)
    with pytest.raises(Exception, match=bad.split("/")[-1]):
        for _ in ld:
            pass


def test_bad_arguments(tiny_build):
    with pytest.raises(ValueError):
        make_loader(tiny_build, split="test")
    with pytest.raises(ValueError):
        make_loader(tiny_build, LoaderOptions(on_error="ignore"))
