"""The one shard reader: checks on what a shard holds, bounded descriptors (issue 13)."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loader_fixtures import write_build
from motion_data.read.loader import LoaderOptions, make_loader
from motion_data.read.ranges import FdCache
from motion_data.read.shard_reader import SampleRefs, read_batch, read_sample
from motion_data.build.shards import array_checksum
from motion_data.common.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _man(root):
    return pq.read_table(root / "manifest.parquet").to_pydict()


def _set_column(root, name, values, dtype=pa.int64()):
    t = pq.read_table(root / "manifest.parquet")
    t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, dtype))
    pq.write_table(t, root / "manifest.parquet")


def _npy_data_offset(blob: bytes, member_ext: str) -> int:
    """Offset (in the sample's bytes) of the array data of member ``<key>.<member_ext>``."""
    pos = 0
    while pos < len(blob):
        name = blob[pos:pos + 100].split(b"\0", 1)[0].decode()
        size = int(blob[pos + 124:pos + 136].rstrip(b"\0 "), 8)
        data = pos + 512
        if name.endswith("." + member_ext):
            hlen = int.from_bytes(blob[data + 8:data + 10], "little")
            return data + 10 + hlen
        pos = data + (size + 511) // 512 * 512
    raise AssertionError(member_ext)


@pytest.mark.parametrize("fix_checksum", [False, True])
def test_nan_in_array_bytes_is_refused_by_name(tmp_path, fix_checksum):
    root = write_build(tmp_path / "b", shard_sizes=(4, 4))
    m = _man(root)
    i = 5
    shard = root / m["shard"][i]
    data = bytearray(shard.read_bytes())
    off = m["offset"][i]
    raw = bytes(data[off:off + m["size"][i]])
    pos_at, st_at, vis_at = (_npy_data_offset(raw, e) for e in ("pos.npy", "stats.npy", "vis.npy"))
    at = off + pos_at + 8 * 7  # point 7's x at frame 0
    data[at:at + 4] = np.float32(np.nan).tobytes()
    shard.write_bytes(data)
    if fix_checksum:  # a manifest that agrees with the damaged bytes: the finite check still refuses
        raw = bytes(data[off:off + m["size"][i]])
        pos = np.frombuffer(raw[pos_at:pos_at + 16 * 16 * 2 * 4], np.float32)
        st = np.frombuffer(raw[st_at:st_at + 3 * 16 * 4], np.float32)
        vis = np.frombuffer(raw[vis_at:vis_at + 16 * 16], np.bool_)
        ck = list(m["checksum"])
        ck[i] = array_checksum(pos, vis, st)
        _set_column(root, "checksum", ck)
    why = "non-finite"  # checked before the checksum, so whatever the manifest says
    with pytest.raises(DataError, match=why) as e:
        read_sample(shard, off, m["size"][i], m["clip_id"][i], _man(root)["checksum"][i])
    assert str(shard) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match=why):
        for _ in make_loader(root, LoaderOptions(batch_size=8), split="all"):
            pass
    ld = make_loader(root, LoaderOptions(batch_size=8, on_error="skip"), split="all")
    ids = [c for b in ld for c in b["clip_id"]]
    assert ld.skipped == 1 and m["clip_id"][i] not in ids and len(ids) == 7
    assert str(shard.name) in ld.skipped_messages[0]
    for b in make_loader(root, LoaderOptions(batch_size=8, on_error="skip"), split="all"):
        assert np.isfinite(b["positions"].numpy()).all()


def test_huge_manifest_size_is_a_shard_error_not_memory_error(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(3, 3))
    m = _man(root)
    sizes = list(m["size"])
    sizes[4] = 1 << 40
    _set_column(root, "size", sizes)
    with pytest.raises(DataError, match="outside the shard") as e:
        for _ in make_loader(root, LoaderOptions(batch_size=6), split="all"):
            pass
    assert m["shard"][4].split("/")[-1] in str(e.value)
    with pytest.raises(DataError, match="outside the shard"):
        read_sample(root / m["shard"][4], m["offset"][4], 1 << 40, m["clip_id"][4])
    ld = make_loader(root, LoaderOptions(batch_size=6, on_error="skip"), split="all")
    assert sum(len(b["clip_id"]) for b in ld) == 5 and ld.skipped == 1


def test_descriptor_cache_is_bounded_and_least_recently_used(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(1,) * 6)
    m = _man(root)
    fds = FdCache(3)
    paths = [str(root / s) for s in m["shard"]]
    for k in range(6):
        refs = SampleRefs([paths[k]], [m["offset"][k]], [m["size"][k]], [m["clip_id"][k]], [m["checksum"][k]])
        pos, vis, st, ok, err = read_batch(fds, refs, 16, 16)
        assert ok.all()
        assert len(fds) == min(k + 1, 3)
    fds.get(paths[3])  # most recent now; opening another evicts the oldest (paths[4])
    fds.get(paths[0])
    assert list(fds._fds) == [paths[5], paths[3], paths[0]]
    fds.close()
    assert len(fds) == 0


_EMFILE = textwrap.dedent("""
    import os, sys
    from motion_data.read.loader import LoaderOptions, make_loader
    root, mode = sys.argv[1], sys.argv[2]
    ld = make_loader(root, LoaderOptions(batch_size=4, on_error=mode), split="all")
    held = []
    try:  # use up every descriptor the process may have
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        for _ in ld:
            pass
    except Exception as e:
        print(type(e).__name__, "|", e, "| skipped", ld.skipped)
        sys.exit(0)
    print("no error", ld.skipped)
""")


def _limited(n):
    def pre():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return pre


def test_running_out_of_descriptors_is_never_blamed_on_a_shard(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(2, 2))
    make_loader(root, LoaderOptions(batch_size=4), split="all")  # numba kernels compiled/cached outside the limit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for mode in ("fail", "skip"):
        r = subprocess.run([sys.executable, "-c", _EMFILE, str(root), mode], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=240, preexec_fn=_limited(256))
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout.strip().splitlines()[-1]
        # an OSError about the process limit, not a DataError, and nothing counted as skipped
        assert out.startswith("OSError") and "too many open files" in out.lower() and out.endswith("skipped 0"), out


def test_training_on_120_shards_under_ulimit_64(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(1,) * 120)
    sets = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=20",
            "training.epochs=1", "training.device=cpu", "data.num_workers=0", "data.val_split=0.1",
            "training.log_interval=1", "training.code_log_interval=1000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tokenizer_train", "train", "--config", str(REPO / "configs/base.yaml"),
           "--data", str(root), "--out", str(tmp_path / "run")] + sum((["--set", s] for s in sets), [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
                       preexec_fn=_limited(64))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Too many open files" not in r.stderr
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0
    shutil.rmtree(tmp_path / "run")
    # two loader workers (each with its own bounded descriptor cache) under the same limit
    code = ("import sys\nfrom motion_data.read.loader import LoaderOptions, make_loader\n"
            "if __name__ == '__main__':\n"
            "    ld = make_loader(sys.argv[1], LoaderOptions(batch_size=20, num_workers=2), split='all')\n"
            "    print(sum(len(b['clip_id']) for b in ld), ld.skipped)\n")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600, preexec_fn=_limited(64))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["120", "0"]
