"""Build format 2 (issue 11): old builds refused everywhere with one line, sample checksums,
the label rule recorded and followed, independent sequences split as their own sources."""
from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from conftest import make_track_file
from motion_data.common.labels import center_class, labels_from_positions
from motion_data.read.loader import LoaderOptions, make_loader
from motion_data.common.errors import DataError
from motion_data.read.verify import verify_build
from motion_data.read.sampler import SamplerConfig
from motion_data.common.static_filter import StaticFilter
from motion_data.build.folder import BuildDir
from motion_data.build.store import read_stats
from preprocess.__main__ import main as preprocess_main
from test_build import run_cli
from tokenizer_train.__main__ import main as train_main

REBUILD = "python -m preprocess build-shards"


def _make_old(src, dst):
    """A copy of a build as the previous format wrote it (attrs, build.json, manifest columns)."""
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst / "stats.zarr"), mode="r+")
    attrs = dict(g.attrs)
    attrs.pop("label_rule")
    attrs["format_version"] = 1
    g.attrs.clear()
    g.attrs.update(attrs)
    doc = json.loads((dst / "build.json").read_text())
    doc["build_format"] = 1
    (dst / "build.json").write_text(json.dumps(doc))
    t = pq.read_table(dst / "manifest.parquet")
    pq.write_table(t.drop_columns(["checksum", "split_group"]), dst / "manifest.parquet")
    return dst


def _one_line_naming(err: str, folder) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(folder) in lines[0] and REBUILD in lines[0]


def test_old_format_build_is_refused_everywhere_with_one_line(tiny_build, tmp_path, capsys):
    old = _make_old(tiny_build, tmp_path / "old")
    with pytest.raises(ValueError) as e:
        make_loader(old, LoaderOptions(batch_size=4), split="all")
    _one_line_naming(str(e.value), old)
    assert preprocess_main(["analyze", str(old)]) == 2
    _one_line_naming(capsys.readouterr().err, old)
    assert preprocess_main(["tune-filter", str(old)]) == 2
    _one_line_naming(capsys.readouterr().err, old)
    assert train_main(["train", "--data", str(old), "--out", str(tmp_path / "run")]) == 2
    _one_line_naming(capsys.readouterr().err, old)
    assert not (tmp_path / "run" / "last.pt").exists()
    # merge reads build.json first: an old part is refused by name too
    assert preprocess_main(["merge", str(old), "--out", str(tmp_path / "m")]) == 2
    _one_line_naming(capsys.readouterr().err, old)
    with pytest.raises(DataError, match="rebuild it with"):
        verify_build(old)


def _flip_pos_byte(build, row):
    """Change one byte of a sample's position data (tar headers and .npy header intact)."""
    t = pq.read_table(build / "manifest.parquet").to_pydict()
    shard = build / t["shard"][row]
    with tarfile.open(shard) as tf:
        m = tf.getmember(f"{t['clip_id'][row]}.pos.npy")
    data = bytearray(shard.read_bytes())
    data[m.offset_data + 128 + 41] ^= 0x01  # past the 128-byte .npy header: a mantissa bit
    shard.write_bytes(data)
    return t["shard"][row].split("/")[-1], t["clip_id"][row]


def test_checksum_mismatch_is_refused_naming_the_shard(tiny_build, tmp_path, capsys):
    root = tmp_path / "b"
    shutil.copytree(tiny_build, root)
    name, cid = _flip_pos_byte(root, 30)
    with pytest.raises(DataError, match=f"{name}.*checksum mismatch"):
        for _ in make_loader(root, LoaderOptions(batch_size=6, epoch_size=60), split="all"):
            pass
    ld = make_loader(root, LoaderOptions(batch_size=6, epoch_size=60, on_error="skip"), split="all")
    ld.set_epoch(0)
    seen = [c for b in ld for c in b["clip_id"]]
    assert cid not in seen and ld.skipped == 1 and len(seen) == 59
    assert "checksum mismatch" in ld.skipped_messages[0] and name in ld.skipped_messages[0]
    # streaming mode and the other readers check it as well
    stream = make_loader(root, LoaderOptions(batch_size=6, epoch_size=600), split="all",
                         sampler=SamplerConfig(mode="streaming"))
    with pytest.raises(Exception, match="checksum mismatch"):
        for _ in stream:
            pass
    with pytest.raises(DataError, match=f"{name}.*checksum mismatch"):
        verify_build(root)
    assert preprocess_main(["analyze", str(root), "--exact", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert name in err and "checksum mismatch" in err and len(err.strip().splitlines()) == 1
    assert verify_build(tiny_build) == 60  # the original is intact


def test_velocity_rule_selectable_recorded_and_followed(tiny_tracks, tiny_build, tmp_path):
    vel_build = tmp_path / "vel"
    assert run_cli("--input", tiny_tracks, "--out", vel_build, "--maxcount", 25, "--label-rule", "velocity",
                   "--no-progress") == 0
    assert BuildDir(vel_build).label_rule == "velocity" and BuildDir(tiny_build).label_rule == "amplify"
    doc = json.loads((vel_build / "build.json").read_text())
    assert doc["config"]["label_rule"] == "velocity" and doc["command"][-3:] == ["--label-rule", "velocity",
                                                                                "--no-progress"]
    # the same positions; the labels (and so the centre counts) follow each build's rule
    flt = StaticFilter(enable=False)
    got = {}
    for b in (tiny_build, vel_build):
        ld = make_loader(b, LoaderOptions(batch_size=60), split="all", static_filter=flt)
        ld.set_epoch(0)
        got[BuildDir(b).label_rule] = next(iter(ld))
    a, v = got["amplify"], got["velocity"]
    assert a["clip_id"] == v["clip_id"] and torch.equal(a["positions"], v["positions"])
    assert torch.equal(a["velocities"], v["velocities"])
    pos = a["positions"].numpy()
    for rule, batch in got.items():
        np.testing.assert_array_equal(batch["labels"].numpy(), labels_from_positions(pos, 15, 128, rule))
    assert not torch.equal(a["labels"], v["labels"])
    c = center_class(15)
    m = pq.read_table(tiny_build / "manifest.parquet", columns=["clip_id"]).column("clip_id").to_pylist()
    order = [m.index(x) for x in a["clip_id"]]
    valid = a["valid"].numpy()
    for rule, b in (("amplify", tiny_build), ("velocity", vel_build)):
        cc = read_stats(b, ["center_count"])["center_count"][order]
        np.testing.assert_array_equal(cc, ((got[rule]["labels"].numpy() == c) & valid).sum(1))
    with pytest.raises(SystemExit):
        preprocess_main(["build-shards", "--input", str(tiny_tracks), "--out", str(tmp_path / "x"),
                         "--label-rule", "rounded"])


def test_four_batched_files_without_start_frame_split_per_sequence(tmp_path):
    """docs/DESIGN.md: (B,T,N,2) files without start_frame hold B independent sequences; four such
    files used to leave the 'train' split empty (each file one source, every window at frame 0)."""
    d = tmp_path / "tracks"
    for i in range(4):
        make_track_file(d / f"f{i}.npz", B=3, T=16, seed=i)
    out = tmp_path / "b"
    assert run_cli("--input", d, "--out", out, "--no-progress") == 0
    groups = pq.read_table(out / "manifest.parquet", columns=["split_group"]).column("split_group").to_pylist()
    assert len(set(groups)) == 12
    train = {c for b in make_loader(out, LoaderOptions(batch_size=2, epoch_size=24), split="train", val_split=0.25)
             for c in b["clip_id"]}
    val = {c for b in make_loader(out, LoaderOptions(batch_size=2), split="val", val_split=0.25) for c in b["clip_id"]}
    assert train and val and train.isdisjoint(val)
    # with start_frame the sequences are windows of one video: one group per file
    w = tmp_path / "windows"
    w.mkdir()
    for i in range(4):
        with np.load(d / f"f{i}.npz") as z:
            np.savez(w / f"f{i}.npz", **z, start_frame=np.array([0, 4, 8]))
    out2 = tmp_path / "b2"
    assert run_cli("--input", w, "--out", out2, "--no-progress") == 0
    groups = pq.read_table(out2 / "manifest.parquet", columns=["split_group"]).column("split_group").to_pylist()
    assert sorted(set(groups)) == [f"f{i}.npz" for i in range(4)]  # named relative to the --input folder


def test_the_streamed_manifest_equals_the_whole_one_and_refuses_duplicate_ids(tiny_build, tmp_path, monkeypatch):
    """ManifestWriter (finalize's): pieces across several row groups read back as the manifest
    they came from; a clip id repeated in a later piece is refused and no file is left."""
    from motion_data.build import manifest as mf

    t = mf.read_manifest(tiny_build)
    cols = t.to_pydict()
    monkeypatch.setattr(mf, "ROW_GROUP", 16)
    w = mf.ManifestWriter(tmp_path / "m.parquet")
    for lo in range(0, len(t), 10):
        w.write({k: v[lo:lo + 10] for k, v in cols.items()})
    w.close()
    assert pq.ParquetFile(tmp_path / "m.parquet").num_row_groups > 1
    assert mf.read_manifest(tmp_path / "m.parquet").equals(t)
    w = mf.ManifestWriter(tmp_path / "d.parquet")
    w.write({k: v[:10] for k, v in cols.items()})
    w.write({k: v[5:15] for k, v in cols.items()})
    with pytest.raises(DataError, match="unique"):
        w.close()
    assert not list(tmp_path.glob("*d.parquet*"))
