"""build-shards killed with SIGKILL at each phase, then re-run with the same command.

A wrapper runs the real CLI and, at the chosen phase, creates a marker file and sleeps; the
test then SIGKILLs it (deterministic, no timing guesses). Checked after the kill: nothing
under a final name is partial (every final shard is byte-identical to an uninterrupted
build's, a present stats.zarr / manifest.parquet is whole and equal to the uninterrupted
one's, no build.json). After the re-run: identical content (clip ids, a hash of every
sample, manifest, store), byte-identical shards, no temporary leftovers, and manifest,
store and shards agree (``read.verify.verify_build``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_track_file
from motion_data.read.verify import verify_build
from preprocess.__main__ import main
from test_build import assert_same_content, content_hashes, zarr_arrays

REPO = Path(__file__).resolve().parents[1]
MAXCOUNT = 5  # 4 inputs x 2 sequences x 4 windows = 32 clips -> 7 shards

WRAPPER = r"""
import os, sys, time
phase, marker = os.environ["E_PHASE"], os.environ["E_MARKER"]
def pause():
    open(marker, "w").close()
    time.sleep(600)
from motion_data.build import build_shards as b
from motion_data.build import finalize as fin
from motion_data.build import manifest as mf
if phase == "mid_shard":  # shard 1's third sample being written (its tar is half done)
    import tarfile  # every tar writer ends in TarFile.addfile, once per member (4 per sample)
    real_add, calls = tarfile.TarFile.addfile, [0]
    def addfile(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 4 * int(os.environ["E_MAXCOUNT"]) + 10:
            f = self.fileobj
            getattr(f, "fileobj", f).flush()  # the half-written tar reaches the disk
            pause()
        return real_add(self, *a, **kw)
    tarfile.TarFile.addfile = addfile
elif phase == "between_shards":  # shard 1 and its record done, shard 2 not started
    real_rec = b.write_shard_and_record
    def rec(ctx, k, *a, **kw):
        n = real_rec(ctx, k, *a, **kw)
        if k == 1:
            pause()
        return n
    b.write_shard_and_record = rec
elif phase == "zarr_write":  # statistics rows written, histograms half written
    import zarr
    real_create = zarr.Group.create_array
    def create_array(self, name, *a, **kw):
        if name == "hist/p95/points":
            pause()
        return real_create(self, name, *a, **kw)
    zarr.Group.create_array = create_array
elif phase == "manifest_write":  # stats.zarr in place, manifest written under its temporary name
    real_flush = mf.ManifestWriter._flush
    def _flush(self):
        real_flush(self)
        pause()
    mf.ManifestWriter._flush = _flush
elif phase == "before_build_json":
    real_json = fin.write_json
    def write_json(path, doc):
        pause()
    fin.write_json = write_json
from preprocess.__main__ import main
sys.exit(main(sys.argv[1:]))
"""

PHASES = ("mid_shard", "between_shards", "zarr_write", "manifest_write", "before_build_json")
FINAL_SHARD = re.compile(r"shard-\d{6}\.tar")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill_in")
    for i in range(4):
        make_track_file(d / f"v{i}.npz", B=2, T=40, seed=20 + i)
    return d


def _args(inputs):
    return ["build-shards", "--input", str(inputs), "--maxcount", str(MAXCOUNT), "--no-progress"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill_ref") / "ref"
    assert main([*_args(inputs), "--out", str(out)]) == 0
    return out


def kill_at(phase, argv, tmp_path, env_extra=None):
    """Run ``python -m preprocess *argv`` until it reaches ``phase``, then SIGKILL it."""
    marker = tmp_path / f"at-{phase}"
    marker.unlink(missing_ok=True)
    env = dict(os.environ, E_PHASE=phase, E_MARKER=str(marker), E_MAXCOUNT=str(MAXCOUNT), **(env_extra or {}))
    p = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], cwd=REPO, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not marker.exists():
        if p.poll() is not None:
            pytest.fail(f"the build ended before {phase}: {p.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, f"the build never reached {phase}"
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL


def assert_nothing_partial_under_a_final_name(out, ref):
    """Every final name holds a whole file equal to the uninterrupted build's."""
    assert not (out / "build.json").exists()
    for p in (out / "shards").iterdir():
        if FINAL_SHARD.fullmatch(p.name):
            assert p.read_bytes() == (ref / "shards" / p.name).read_bytes(), p.name
        else:  # the only other thing allowed: a temporary name
            assert ".tmp" in p.name, p.name
    if (out / "stats.zarr").exists():
        za, aa = zarr_arrays(out)
        zb, ab = zarr_arrays(ref)
        assert aa == ab
        for k in za:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    if (out / "manifest.parquet").exists():
        assert pq.read_table(out / "manifest.parquet").equals(pq.read_table(ref / "manifest.parquet"))
    for p in out.iterdir():
        assert p.name in ("shards", "stats.zarr", "manifest.parquet", ".work") or ".tmp" in p.name, p.name


def assert_finished_like(out, ref):
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "manifest.parquet", "shards", "stats.zarr"]
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted(p.name for p in (ref / "shards").iterdir())
    for n in names:
        assert (out / "shards" / n).read_bytes() == (ref / "shards" / n).read_bytes(), n
    assert_same_content(out, ref)
    assert verify_build(out) == verify_build(ref) == 32


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_then_rerun_equals_an_uninterrupted_build(phase, inputs, reference, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*_args(inputs), "--out", str(out)]
    kill_at(phase, argv, tmp_path)
    assert_nothing_partial_under_a_final_name(out, reference)
    shards = sorted(p.name for p in (out / "shards").iterdir() if FINAL_SHARD.fullmatch(p.name))
    if phase == "mid_shard":
        assert shards == ["shard-000000.tar"] and list((out / "shards").glob(".shard-000001.tar.tmp*"))
    elif phase == "between_shards":
        assert shards == ["shard-000000.tar", "shard-000001.tar"]
    elif phase == "zarr_write":
        assert not (out / "stats.zarr").exists() and list(out.glob(".stats.zarr.tmp*"))
    elif phase == "manifest_write":
        assert (out / "stats.zarr").exists() and not (out / "manifest.parquet").exists()
        assert list(out.glob(".manifest.parquet.tmp*"))
    else:
        assert (out / "stats.zarr").exists() and (out / "manifest.parquet").exists()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "32 clips" in text
    assert_finished_like(out, reference)


def test_killed_twice_then_finished(inputs, reference, tmp_path):
    """Killed mid-shard, then the resumed run killed during the Zarr write, then finished."""
    out = tmp_path / "out"
    argv = [*_args(inputs), "--out", str(out)]
    kill_at("mid_shard", argv, tmp_path)
    kill_at("zarr_write", argv, tmp_path)
    assert_nothing_partial_under_a_final_name(out, reference)
    assert main(argv) == 0
    assert_finished_like(out, reference)
    assert [k for k, _ in content_hashes(out)] == pq.read_table(reference / "manifest.parquet").column(
        "clip_id").to_pylist()


def test_build_json_write_removes_a_temp_left_by_a_killed_writer(tmp_path):
    import json

    from motion_data.build.finalize import write_json

    stale = tmp_path / ".build.json.tmp12345"
    stale.write_text('{"half": ')
    write_json(tmp_path / "build.json", {"ok": True})
    assert not stale.exists() and json.loads((tmp_path / "build.json").read_text()) == {"ok": True}
