"""Loader throughput (clips/s) with 0, 1 and 2 workers, next to the seed's old layout.

Baseline (written here, as the seed's pipeline did it): one ``.pt`` file per clip holding
normalised velocities and visibility, read with ``torch.load`` in ``__getitem__``, the
static mask computed per clip with ``torch.quantile`` (p95 of the speed over valid steps,
min_keep top points) and labels per clip; torch's default collate.
wids (webdataset's indexed reader, ``pip install wids``), what a user would pick instead: its
``ShardListDataset`` over the same tar shards (random access by sample index, the tar member
index built by wids), a shuffled DataLoader, and the same per-batch assembly as ours
(``motion_data.read.batch.make_batch``: labels, masks, velocities).
New: ``motion_data.read.loader.make_loader`` over a ``build-shards`` output of the same clips
(byte-range reads from the tar shards, mask/labels per batch).

Both use the static filter p95@0.04 (min_keep 16), batch 64, the same worker start method
(forkserver) and persistent workers; one warm-up epoch, then the mean of timed epochs.
Targets (issue #3): >= 5x the baseline at each worker count, >= 5,000 clips/s with 2
workers, for 16-frame x 400-point clips; issue 13: 2 workers at least as fast as in process.
On a loaded 2-core machine both rates swing with the load; the CPU-second column does not.

    python benchmarks/bench_loader.py [--clips 1024 --epochs 2 --batch 64]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from motion_data.build.build_shards import build
from motion_data.build.setup import Options
from motion_data.common.labels import labels_from_norm
from motion_data.read.loader import LoaderOptions, make_loader
from motion_data.common.static_filter import StaticFilter

FLT = StaticFilter(enable=True, metric="p95", threshold=0.04, min_keep=16)


def write_tracks(d: Path, clips: int, per_file: int = 64, grid: int = 20, T: int = 16, seed: int = 0):
    """CoTracker-style .npz inputs: ``per_file`` one-window sequences per file, 30% moving points."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.linspace(8, 248, grid), np.linspace(8, 184, grid))
    base = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
    for f, lo in enumerate(range(0, clips, per_file)):
        B = min(per_file, clips - lo)
        tr = np.broadcast_to(base, (B, T, base.shape[0], 2)).copy()
        tr += rng.normal(0, 0.05, tr.shape).astype(np.float32)
        mov = rng.random((B, 1, base.shape[0], 1)) < 0.3
        tr += mov * np.cumsum(rng.normal(0, 1.5, (B, T, 1, 2)), 1).astype(np.float32)
        vis = rng.random((B, T, base.shape[0])) > 0.02
        np.savez(d / f"video_{f:04d}.npz", tracks=tr, visibility=vis, image_size=np.array([192, 256]))


# ----------------------------------------------------------------------------- the baseline

class PtClipDataset(torch.utils.data.Dataset):
    """The seed's layout: one .pt per clip, everything per sample."""

    def __init__(self, files, flt: StaticFilter):
        self.files, self.flt = files, flt

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        d = torch.load(self.files[i], weights_only=True)
        v, valid = d["velocities"], d["valid"]
        speed = v.norm(dim=-1).masked_fill(~valid, float("nan"))
        p95 = torch.nan_to_num(torch.nanquantile(speed, 0.95, dim=0), nan=0.0)
        keep = p95 >= self.flt.threshold
        if keep.sum() < self.flt.min_keep:
            keep = torch.zeros_like(keep)
            keep[torch.topk(p95, self.flt.min_keep).indices] = True
        return {"velocities": v, "labels": labels_from_norm(v), "mask": keep[None] & valid, "valid": valid,
                "dynamic_ratio": keep.float().mean()}


def write_pt(build_dir: Path, d: Path) -> list[str]:
    """The same clips as the build, one .pt file each."""
    ld = make_loader(build_dir, LoaderOptions(batch_size=256), split="all", sampler=None, static_filter=StaticFilter())
    d.mkdir()
    files = []
    for b in ld:
        for j, cid in enumerate(b["clip_id"]):
            p = d / f"{cid}.pt"
            torch.save({"velocities": b["velocities"][j].clone(), "valid": b["valid"][j].clone()}, p)
            files.append(str(p))
    return files


def baseline_loader(files, workers: int, batch: int):
    kw = {}
    if workers:
        kw = {"persistent_workers": True, "multiprocessing_context": multiprocessing.get_context("forkserver")}
    return torch.utils.data.DataLoader(PtClipDataset(files, FLT), batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, **kw)


_TCK = os.sysconf("SC_CLK_TCK")


class WidsClips(torch.utils.data.Dataset):
    """The build's shards through wids.ShardListDataset: one raw clip per index."""

    def __init__(self, build_dir: Path):
        import pyarrow.parquet as pq

        shard = pq.read_table(build_dir / "manifest.parquet", columns=["shard"]).column("shard").to_pylist()
        counts = {s: shard.count(s) for s in sorted(set(shard))}
        self.shards = [{"url": str(build_dir / s), "nsamples": n} for s, n in counts.items()]
        self.ds = None  # opened in each worker (file handles do not cross a fork)
        self.n = len(shard)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import wids

        if self.ds is None:
            self.ds = wids.ShardListDataset(self.shards, localname=lambda u: u, transformations=[])
        s = self.ds[i]
        return (np.load(s[".pos.npy"]), np.load(s[".vis.npy"]), np.load(s[".stats.npy"]), s["__key__"])


def wids_collate(items):
    from motion_data.read.batch import BatchRecipe, make_batch

    pos, vis, st, ids = zip(*items)
    return make_batch(np.stack(pos), np.stack(vis), np.stack(st), list(ids), BatchRecipe(FLT, 15))


def wids_loader(build_dir: Path, workers: int, batch: int):
    kw = {"persistent_workers": True, "multiprocessing_context": multiprocessing.get_context("forkserver")} \
        if workers else {}
    return torch.utils.data.DataLoader(WidsClips(build_dir), batch_size=batch, shuffle=True, num_workers=workers,
                                       collate_fn=wids_collate, generator=torch.Generator().manual_seed(0), **kw)


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / _TCK


def _worker_pids(dl) -> list[int]:
    it = getattr(dl, "_iterator", None)
    return [w.pid for w in getattr(it, "_workers", [])]


def throughput(loader, epochs: int, set_epoch=None, dl=None) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second of the main process and its workers).

    The second figure does not depend on what else runs on the machine: on idle cores the
    wall figure approaches it times the number of busy processes' cores.
    """
    dl = dl if dl is not None else loader

    def one(e):
        if set_epoch:
            set_epoch(e)
        return sum(b["velocities"].shape[0] for b in loader)

    one(0)  # warm-up: worker start, numba cache, page cache
    pids = _worker_pids(dl)
    c, wc = time.process_time(), [_cpu_s(p) for p in pids]
    t, n = time.perf_counter(), 0
    for e in range(1, epochs + 1):
        n += one(e)
    wall = time.perf_counter() - t
    cpu = time.process_time() - c + sum(_cpu_s(p) - w for p, w in zip(pids, wc))
    return n / wall, n / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1024, help="clips in the benchmark build")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration (after one warm-up)")
    ap.add_argument("--batch", type=int, default=64, help="batch size")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loader's process does small element-wise work; same for both
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        write_tracks(tmp / "in", args.clips)
        build([str(tmp / "in")], tmp / "build", Options(maxcount=256), workers=1, progress=False)
        files = write_pt(tmp / "build", tmp / "pt")
        print(f"{len(files)} clips of 16 frames x 400 points, batch {args.batch}, filter {FLT}")
        print(f"{'':>7} | {'clips per wall second':^48} | {'clips per CPU second (main + workers)':^48}")
        print(f"{'workers':>7} | {'baseline .pt':>12} {'wids':>10} {'loader':>10} {'vs wids':>10} | "
              f"{'baseline .pt':>12} {'wids':>10} {'loader':>10} {'vs wids':>10}")
        for w in args.workers:
            bl = baseline_loader(files, w, args.batch)
            base, base_cpu = throughput(bl, args.epochs)
            wl = wids_loader(tmp / "build", w, args.batch)
            wd, wd_cpu = throughput(wl, args.epochs)
            opts = LoaderOptions(batch_size=args.batch, num_workers=w, persistent_workers=w > 0, seed=0)
            ld = make_loader(tmp / "build", opts, split="all", static_filter=FLT)
            new, new_cpu = throughput(ld, args.epochs, ld.set_epoch, ld.dataloader)
            print(f"{w:>7} | {base:>12,.0f} {wd:>10,.0f} {new:>10,.0f} {new / wd:>9.1f}x | "
                  f"{base_cpu:>12,.0f} {wd_cpu:>10,.0f} {new_cpu:>10,.0f} {new_cpu / wd_cpu:>9.1f}x", flush=True)
            del bl, wl, ld
        print(f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} usable CPUs; targets: "
              ">= 5x the baseline per worker count, >= 5,000 clips/s with 2 workers, 2 workers >= in process")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
