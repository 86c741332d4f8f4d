"""build-shards end to end: layout, readers, statistics, bad input, resume, workers."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zarr

from conftest import TINY_FILES, TINY_MAXCOUNT, TINY_T, make_track_file, make_tracks
from motion_data.build import build_shards as bld
from motion_data.build.setup import BUILD_FORMAT, Options
from motion_data.common.clips import window_starts
from motion_data.common.clips import Sequence, cut_windows
from motion_data.common.labels import labels_from_positions, normalize, ring_map, step_valid, velocities
from motion_data.build.manifest import COLUMNS, SCHEMA, read_manifest
from motion_data.read.shard_reader import read_sample
from motion_data.build.shards import array_checksum, encode_sample, index_shard, sample_checksum, write_shard
from motion_data.build.folder import BuildDir
from motion_data.build.store import FORMAT_VERSION
from motion_data.common.static_filter import METRICS
from conftest import class_histograms, point_stats
from preprocess.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def samples(build_dir):
    t = read_manifest(build_dir)
    rows = t.to_pylist()
    ss = [read_sample(Path(build_dir) / r["shard"], r["offset"], r["size"], r["clip_id"], r["checksum"]) for r in rows]
    for x in ss:  # the derived arrays, as every reader forms them
        x["vel"], x["valid"] = velocities(x["pos"]), step_valid(x["vis"])
    return rows, ss


def content_hashes(build_dir):
    _, ss = samples(build_dir)
    out = []
    for s in ss:
        h = hashlib.sha1()
        for k in ("pos", "vis", "stats"):
            h.update(np.ascontiguousarray(s[k]).tobytes())
        h.update(json.dumps(s["meta"], sort_keys=True).encode())
        out.append((s["key"], h.hexdigest()))
    return out


def zarr_arrays(build_dir):
    g = zarr.open_group(str(Path(build_dir) / "stats.zarr"), mode="r")
    names = [f"stats/{m}" for m in (*METRICS, "center_count", "valid_count")] + ["label_ring"]
    names += [f"hist/{m}/{h}" for m in METRICS for h in ("points", "topk")]
    return {n: g[n][:] for n in names}, dict(g.attrs)


def assert_same_content(a, b, offsets=True):
    ta, tb = read_manifest(a), read_manifest(b)
    cols = [c for c in COLUMNS if offsets or c not in ("shard", "offset", "size")]
    assert ta.select(cols).equals(tb.select(cols))
    assert content_hashes(a) == content_hashes(b)
    za, aa = zarr_arrays(a)
    zb, ab = zarr_arrays(b)
    assert aa == ab
    for k in za:
        np.testing.assert_array_equal(za[k], zb[k], err_msg=k)


def run_cli(*argv):
    return main(["build-shards", *map(str, argv)])


# ---------------------------------------------------------------- layout and readers


def test_tiny_build_layout(tiny_build):
    files = sorted(p.name for p in tiny_build.iterdir())
    assert files == ["build.json", "manifest.parquet", "shards", "stats.zarr"]  # no .work, no temp files
    assert sorted(p.name for p in (tiny_build / "shards").iterdir()) == [f"shard-{i:06d}.tar" for i in range(3)]
    t = pq.read_table(tiny_build / "manifest.parquet")
    assert t.schema.equals(SCHEMA)
    assert t.num_rows == 60
    assert [t.column("shard").to_pylist().count(f"shards/shard-{i:06d}.tar") for i in range(3)] == [25, 25, 10]
    z, attrs = zarr_arrays(tiny_build)
    assert attrs["format_version"] == FORMAT_VERSION == 2 and attrs["n_clips"] == 60 and attrs["N"] == 100
    assert attrs["T"] == 16 and attrs["label_rule"] == "amplify" == BuildDir(tiny_build).label_rule
    assert attrs["W"] == 15 and attrs["ref_size"] == 128 and attrs["metrics"] == list(METRICS)
    assert attrs["build_filter"] == {"metric": "p95", "threshold": 0.04, "min_keep": 16}
    for m in METRICS:
        assert z[f"stats/{m}"].shape == (60, 100) and z[f"stats/{m}"].dtype == np.float32
        assert z[f"hist/{m}/points"].dtype == np.int64
        assert z[f"hist/{m}/points"][:, -1].sum() == 60 * 100  # every point counted once per metric
    assert z["stats/center_count"].dtype == np.uint8
    np.testing.assert_array_equal(z["label_ring"], ring_map(15))
    doc = json.loads((tiny_build / "build.json").read_text())
    assert doc["summary"]["clips"] == 60 and doc["summary"]["shards"] == 3 and doc["summary"]["skipped"] == []
    assert [i["clips"] for i in doc["inputs"]] == [18, 18, 18, 6]
    assert doc["config"]["maxcount"] == TINY_MAXCOUNT and "total_s" in doc["timings"]
    assert doc["build_format"] == BUILD_FORMAT == 2 and doc["config"]["label_rule"] == "amplify"


def test_plain_webdataset_reads_the_shards_in_manifest_order(tiny_build):
    t = read_manifest(tiny_build)
    urls = [str(tiny_build / "shards" / f"shard-{i:06d}.tar") for i in range(3)]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == t.column("clip_id").to_pylist()
    s = got[0]
    assert s["pos.npy"].shape == (16, 100, 2) and s["vis.npy"].shape == (16, 100)
    assert s["pos.npy"].dtype == np.float32 and s["vis.npy"].dtype == np.bool_
    assert s["stats.npy"].shape == (3, 100) and s["json"]["sequence"] == 0


def test_write_shard_bytes_equal_webdataset_tarwriter(tmp_path):
    """write_shard drives tarfile directly for speed; its shards stay exactly TarWriter's."""
    rng = np.random.default_rng(3)
    ss = [encode_sample(f"clip{i}-abc", rng.normal(60, 20, (4, 5, 2)), rng.random((4, 5)) > 0.3,
                        rng.random((3, 5)), {"source": f"d/ü{i}.npz", "sequence": i, "start_frame": 2 * i})
          for i in range(3)]
    index = write_shard(tmp_path / "a.tar", ss, mtime=12345)
    with open(tmp_path / "b.tar", "wb") as f, wds.TarWriter(f, mtime=12345) as sink:
        for x in ss:
            sink.write(x)
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    assert index == index_shard(tmp_path / "a.tar")
    for (key, off, size), x in zip(index, ss):
        got = read_sample(tmp_path / "a.tar", off, size, key, sample_checksum(x))
        assert np.array_equal(got["pos"], x["pos.npy"]) and got["meta"] == x["json"]
        assert np.array_equal(got["vis"], x["vis.npy"]) and got["checksum"] == sample_checksum(x)


def test_manifest_offsets_and_stats_match_the_shard_data(tiny_build):
    rows, ss = samples(tiny_build)
    pos, vis = np.stack([s["pos"] for s in ss]), np.stack([s["vis"] for s in ss])
    vel = np.stack([s["vel"] for s in ss])
    valid = np.stack([s["valid"] for s in ss])
    assert [s["key"] for s in ss] == [r["clip_id"] for r in rows]
    assert [r["checksum"] for r in rows] == [array_checksum(s["pos"], s["vis"], s["stats"]) for s in ss]
    z, _ = zarr_arrays(tiny_build)
    ref = point_stats(pos, vis)
    for k in ref:
        np.testing.assert_array_equal(z[f"stats/{k}"], ref[k], err_msg=k)
    np.testing.assert_array_equal(np.stack([s["stats"] for s in ss]), np.stack([ref[m] for m in METRICS], 1))
    for m in METRICS:
        points, topk = class_histograms(pos, vis, m)
        np.testing.assert_array_equal(z[f"hist/{m}/points"], points)
        np.testing.assert_array_equal(z[f"hist/{m}/topk"], topk)
    # manifest figures from plain numpy (not the build's own helper)
    speed = np.linalg.norm(normalize(vel), axis=-1)
    np.testing.assert_allclose([r["mean_speed"] for r in rows],
                               (speed * valid).sum((1, 2)) / valid.sum((1, 2)), rtol=1e-5)
    np.testing.assert_allclose([r["visible_fraction"] for r in rows], valid.mean((1, 2)), rtol=1e-6)
    score, vc = ref["p95"], ref["valid_count"]
    labels = labels_from_positions(pos)  # the build's rule: amplify
    for i, r in enumerate(rows):
        keep = score[i] >= np.float32(0.04)
        if keep.sum() < 16:
            cand = np.flatnonzero(vc[i] > 0)
            keep = np.zeros(100, bool)
            keep[cand[np.argsort(-score[i][cand], kind="stable")[:16]]] = True
        assert r["dynamic_ratio"] == pytest.approx(keep.mean())
        lab = labels[i][valid[i] & keep[None]]
        assert r["center_share"] == pytest.approx((lab == 112).mean() if lab.size else 0.0, abs=1e-6)


def test_clips_are_the_windows_of_the_track_files(tiny_build, tiny_tracks):
    rows, ss = samples(tiny_build)
    expect = []
    for name, B, _ in TINY_FILES:
        with np.load(tiny_tracks / name) as f:
            tracks, vis, (H, W) = f["tracks"], f["visibility"], f["image_size"]
        for b in range(B):
            for s0 in range(0, TINY_T - 16 + 1, 8):
                tr = tracks[b, s0:s0 + 16].astype(np.float64)
                p = (tr * [128 / W, 128 / H]).astype(np.float32)
                v = np.diff(p, axis=0)
                expect.append((name, b, s0, p, v, vis[b, s0:s0 + 16],  # named relative to the --input folder
                               vis[b, s0:s0 + 15] & vis[b, s0 + 1:s0 + 16]))
    assert len(expect) == len(rows)
    for r, s, (src, b, s0, p, v, vs, m) in zip(rows, ss, expect):
        h8 = hashlib.sha1(src.encode()).hexdigest()[:8]
        assert r["clip_id"] == f"{Path(src).stem}-{h8}-s{b:04d}-f{s0:06d}"
        assert (r["source"], r["sequence"], r["start_frame"]) == (src, b, s0)
        np.testing.assert_array_equal(s["pos"], p)
        np.testing.assert_array_equal(s["vis"], vs)
        np.testing.assert_allclose(s["vel"], v, atol=1e-5)
        np.testing.assert_array_equal(s["valid"], m)
        assert r["split_group"] == f"{src}#{b}" if B > 1 else src  # independent sequences (no start_frame)


def test_window_starts_agree_with_cut_windows():
    rng = np.random.default_rng(0)
    for T in (3, 14, 15, 16, 23, 40):
        for window, stride in ((16, 8), (4, 3), (2, 1)):
            seq = Sequence("x", 0, rng.normal(size=(T, 2, 2)).astype(np.float32), np.ones((T, 2), bool), 5)
            ref = [sf for sf, _, _ in cut_windows(seq, window, stride)]
            assert list(5 + window_starts(T, window, stride)) == ref


# ---------------------------------------------------------------- CLI, reruns, arguments


def test_cli_build_rerun_is_noop_and_other_args_are_refused(tmp_path, tiny_tracks, capsys):
    out = tmp_path / "b"
    assert run_cli("--input", tiny_tracks, "--out", out, "--maxcount", 25, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "60 clips" in text and "3 shards" in text
    doc = json.loads((out / "build.json").read_text())
    assert doc["command"][:4] == ["python", "-m", "preprocess", "build-shards"] and "--maxcount" in doc["command"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert run_cli("--input", tiny_tracks, "--out", out, "--maxcount", 25, "--no-progress") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    assert run_cli("--input", tiny_tracks, "--out", out, "--maxcount", 25, "--stride", 4, "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stride" in err and str(out) in err


def test_the_same_inputs_copied_elsewhere_are_the_same_build(tmp_path, tiny_tracks, capsys):
    """The fingerprint holds names, sizes and content hashes, no mtime or absolute path: a copy
    with new mtimes in another folder is up to date; one changed byte is refused."""
    out = tmp_path / "b"
    assert run_cli("--input", tiny_tracks, "--out", out, "--maxcount", 25, "--no-progress") == 0
    copy = tmp_path / "copy"
    shutil.copytree(tiny_tracks, copy)
    for p in copy.iterdir():
        os.utime(p, (1, 1))
    capsys.readouterr()
    assert run_cli("--input", copy, "--out", out, "--maxcount", 25, "--no-progress") == 0
    assert "nothing to do" in capsys.readouterr().out
    victim = sorted(copy.iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert run_cli("--input", copy, "--out", out, "--maxcount", 25, "--no-progress") == 2
    assert "inputs" in capsys.readouterr().err


def test_overwrite_unblocks_a_failed_build_and_keeps_other_files(tmp_path, capsys):
    d = tmp_path / "in"
    make_track_file(d / "a.npz", B=1, T=32, seed=1)
    tracks, vis = make_tracks(B=1, T=32, seed=2)
    tracks[0, 3, 5], vis[0, 3, 5] = np.nan, True
    np.savez(d / "b.npz", tracks=tracks, visibility=vis, image_size=np.array([96, 128]))
    out = tmp_path / "o"
    args = ["--input", d, "--out", out, "--maxcount", 2, "--no-progress"]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "b.npz" in err and "--on-error skip" in err and "--overwrite" in err
    assert (out / ".work" / "config.json").exists() and not (out / "build.json").exists()
    # fixing the file changes the inputs: the unfinished build blocks OUT, and says how out
    make_track_file(d / "b.npz", B=1, T=32, seed=2)
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unfinished build" in err and "--overwrite" in err
    mine = ("notes.txt", "build.json.old", "shards.tmp-notes.txt")  # not the build's, however named
    for n in mine:
        (out / n).write_text("mine")
    (out / ".stats.zarr.tmp123").mkdir()  # temporaries of the build's (atomic.temp_path)
    (out / ".manifest.parquet.tmp99").write_text("x")
    assert run_cli(*args, "--overwrite") == 0
    assert all((out / n).read_text() == "mine" for n in mine)  # left alone
    assert not (out / ".stats.zarr.tmp123").exists() and not (out / ".manifest.parquet.tmp99").exists()
    for n in mine:
        (out / n).unlink()
    ref = tmp_path / "ref"
    assert run_cli("--input", d, "--out", ref, "--maxcount", 2, "--no-progress") == 0
    assert_same_content(out, ref)
    # a finished build with other arguments: refused, naming --overwrite; replaced with it
    assert run_cli(*args, "--stride", 4) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(*args, "--stride", 4, "--overwrite") == 0
    assert json.loads((out / "build.json").read_text())["config"]["stride"] == 4
    assert "--overwrite" not in json.loads((out / "build.json").read_text())["command"]  # re-running it resumes
    assert read_manifest(out).num_rows == 2 * 5  # T=32, window 16, stride 4: 5 clips per file
    # a folder that holds no build is never emptied, not even with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("keep")
    assert run_cli("--input", d, "--out", other, "--overwrite", "--no-progress") == 2
    assert "holds no build" in capsys.readouterr().err and (other / "x.txt").read_text() == "keep"


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build-shards", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--input", "--out", "--format", "--window", "--stride", "--ref-size", "--window-size", "--workers",
                "--maxcount", "--part", "--on-error", "--image-size", "--views", "--filter", "--min-keep",
                "--overwrite", "--no-progress"):
        assert opt in text
    import argparse
    from preprocess import build_cmd
    p = argparse.ArgumentParser()
    build_cmd.add_arguments(p)
    assert all(a.help for a in p._actions)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def bad_inputs(tmp_path):
    return make_bad_inputs(tmp_path)


def make_bad_inputs(tmp_path):
    """Two good track files and four bad ones (corrupt, empty, NaN, too short)."""
    d = tmp_path / "in"
    make_track_file(d / "a_good.npz", B=1, T=32, seed=1)
    (d / "b_corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip file at all")
    (d / "c_empty.npz").write_bytes(b"")
    tr, vis = make_track_file(d / "tmp.npz", B=1, T=32, seed=2), None
    with np.load(tr) as f:
        tracks, vis, size = f["tracks"].copy(), f["visibility"], f["image_size"]
    tr.unlink()
    tracks[0, 5, 3] = np.nan
    np.savez(d / "d_nan.npz", tracks=tracks, visibility=np.ones_like(vis), image_size=size)
    make_track_file(d / "e_short.npz", B=2, T=10, seed=3)
    make_track_file(d / "f_good.npz", B=1, T=24, seed=4)
    return d


def test_on_error_fail_names_the_file_in_one_line(bad_inputs, tmp_path, capsys):
    rc = run_cli("--input", bad_inputs, "--out", tmp_path / "o", "--no-progress")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "b_corrupt.npz" in err
    for name in ("c_empty.npz", "d_nan.npz", "e_short.npz"):
        rc = run_cli("--input", bad_inputs / "a_good.npz", bad_inputs / name, "--out", tmp_path / name,
                     "--no-progress")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and name in err, err
    assert "shorter than the window" in err  # the last one: T=10 < 16


def test_on_error_skip_reports_and_keeps_good_clips(bad_inputs, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli("--input", bad_inputs, "--out", out, "--on-error", "skip", "--maxcount", 2, "--no-progress") == 0
    text = capsys.readouterr().out
    doc = json.loads((out / "build.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in doc["summary"]["skipped"]}
    assert set(skipped) == {"b_corrupt.npz", "c_empty.npz", "d_nan.npz", "e_short.npz"}
    assert "non-finite" in skipped["d_nan.npz"] or "nan" in skipped["d_nan.npz"].lower()
    for name in skipped:
        assert name in text
    t = read_manifest(out)
    # a_good: T=32 -> 3 windows; f_good: T=24 -> 2 windows
    assert [Path(s).name for s in t.column("source").to_pylist()] == ["a_good.npz"] * 3 + ["f_good.npz"] * 2
    assert doc["summary"]["clips"] == 5 and doc["summary"]["inputs_used"] == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_on_error_skip_drops_only_the_bad_sequence(tmp_path, capsys, workers):
    """A (B,T,N,2) file with a visible NaN in one sequence: skip keeps its 3 good sequences."""
    tr = make_track_file(tmp_path / "tmp.npz", B=4, T=32, seed=5)
    with np.load(tr) as f:
        tracks, vis, size = f["tracks"].copy(), f["visibility"].copy(), f["image_size"]
    tracks[2, 7, 4] = np.nan
    vis[2, 7, 4] = True
    d = tmp_path / "in"
    d.mkdir()
    np.savez(d / "x.npz", tracks=tracks, visibility=vis, image_size=size)
    assert run_cli("--input", d, "--out", tmp_path / "fail", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "x.npz[2]" in err and "non-finite" in err
    out = tmp_path / "o"
    assert run_cli("--input", d, "--out", out, "--on-error", "skip", "--workers", workers) == 0
    text = capsys.readouterr().out
    assert "skipped 1 bad sequences" in text and "x.npz[2]" in text
    t = read_manifest(out)
    assert t.column("sequence").to_pylist() == [0] * 3 + [1] * 3 + [3] * 3  # T=32: 3 windows each
    doc = json.loads((out / "build.json").read_text())
    s = doc["summary"]
    assert s["clips"] == 9 and s["sequences"] == 3 and s["skipped"] == [] and s["inputs_used"] == 1
    assert len(s["sequences_skipped"]) == 1 and "x.npz[2]" in s["sequences_skipped"][0]
    assert doc["inputs"][0]["bad_sequences"] == s["sequences_skipped"]


def test_point_count_mismatch_is_an_error_naming_the_file(tmp_path, capsys):
    make_track_file(tmp_path / "in" / "a.npz", B=1, T=20, grid=10)
    make_track_file(tmp_path / "in" / "b.npz", B=1, T=20, grid=8)
    assert run_cli("--input", tmp_path / "in", "--out", tmp_path / "o", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "b.npz" in err and "N=64" in err and "N=100" in err


# ---------------------------------------------------------------- determinism, resume


def test_workers_do_not_change_the_output(tiny_tracks, tiny_build, tmp_path):
    out = tmp_path / "w2"
    s = bld.build([str(tiny_tracks)], out, Options(maxcount=TINY_MAXCOUNT), workers=2, progress=False)
    assert s["clips"] == 60
    assert_same_content(out, tiny_build)
    for i in range(3):  # byte-identical, not just equal content
        name = f"shards/shard-{i:06d}.tar"
        assert (out / name).read_bytes() == (tiny_build / name).read_bytes()


def test_resume_after_an_exception_mid_build(tiny_tracks, tiny_build, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = bld.write_shard_and_record
    calls = []

    def crash_on_second(ctx, k, *a, **kw):
        calls.append(k)
        if k == 1:
            raise KeyboardInterrupt
        return real(ctx, k, *a, **kw)

    monkeypatch.setattr(bld, "write_shard_and_record", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        bld.build([str(tiny_tracks)], out, Options(maxcount=TINY_MAXCOUNT), progress=False)
    monkeypatch.setattr(bld, "write_shard_and_record", lambda ctx, k, *a, **kw: calls.append(k) or real(ctx, k, *a, **kw))
    assert not (out / "build.json").exists() and (out / ".work" / "rec-000000.npz").exists()
    s = bld.build([str(tiny_tracks)], out, Options(maxcount=TINY_MAXCOUNT), progress=False)
    assert calls == [0, 1, 1, 2]  # shard 0 was not redone
    assert s["status"] == "resumed" and s["resumed_shards"] == 1 and s["clips_this_run"] == 35
    assert_same_content(out, tiny_build)


def test_resume_after_sigkill_and_a_lost_shard(tmp_path, capsys):
    """Kill a CLI build mid-way with SIGKILL, also lose a finished shard; re-running the
    same command gives the same content as an uninterrupted build, without duplicates."""
    inp = tmp_path / "in"
    for i in range(6):
        make_track_file(inp / f"v{i}.npz", B=2, T=40, seed=10 + i)
    args = ["--input", str(inp), "--maxcount", "5", "--no-progress"]
    slow = ("import sys, time; from motion_data.build import build_shards as b; real = b.write_shard_and_record\n"
            "def slow(*a, **k):\n    n = real(*a, **k); time.sleep(0.3); return n\n"
            "b.write_shard_and_record = slow\nfrom preprocess.__main__ import main\nsys.exit(main(sys.argv[1:]))")
    out = tmp_path / "killed"
    # 2 workers: the kill also hits a pool mid-write; the resume below runs with 1
    p = subprocess.Popen([sys.executable, "-c", slow, "build-shards", *args, "--workers", "2", "--out", str(out)],
                         cwd=REPO, start_new_session=True)
    deadline = time.time() + 60
    while not (out / ".work" / "rec-000002.npz").exists():
        assert p.poll() is None and time.time() < deadline, "build ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # its own session: the build and its workers only
    p.wait()
    assert not (out / "build.json").exists()
    (out / "shards" / "shard-000001.tar").unlink()  # lost shard: it and everything after are redone
    assert run_cli(*args, "--out", out) == 0
    assert "resumed after 1 finished shards" in capsys.readouterr().out
    ref = tmp_path / "ref"
    assert run_cli(*args, "--out", ref) == 0
    assert_same_content(out, ref)
    t = read_manifest(out)
    assert t.num_rows == 6 * 2 * 4 and len(set(t.column("clip_id").to_pylist())) == t.num_rows


def test_laps_pt_folder_of_single_clip_files(tmp_path):
    torch = pytest.importorskip("torch")
    d = tmp_path / "laps"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        torch.save(torch.from_numpy(rng.uniform(-0.3, 0.3, (15, 36, 2)).astype(np.float32)), d / f"clip{i}.pt")
    out = tmp_path / "o"
    assert run_cli("--input", d, "--out", out, "--format", "laps-pt", "--maxcount", 2, "--no-progress") == 0
    rows, ss = samples(out)
    assert [r["source"] for r in rows] == [f"clip{i}.pt" for i in range(5)]
    assert sorted({r["shard"] for r in rows}) == [f"shards/shard-{i:06d}.tar" for i in range(3)]
    v = torch.load(d / "clip3.pt", weights_only=True).numpy()
    # (W-1)/2 = 7 px per unit; float32 positions about the frame centre round to ~1e-5 px
    np.testing.assert_allclose(ss[3]["vel"], v * 7.0, rtol=1e-6, atol=2e-5)
    assert (ss[3]["pos"][0] == 64.0).all()
