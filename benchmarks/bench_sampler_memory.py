"""Memory and time of the exact sampler at scale: one epoch's draw of ``--clips`` clips.

Peak bytes allocated (tracemalloc, which sees numpy's arrays) while the sampler is built and
``epoch_draw`` runs, with and without ``shard_affinity``; the sampler never reads per-point
arrays (weights are per clip: ``sampling_weights`` reads ``stats.zarr`` 65,536 clips at a time).

    python benchmarks/bench_sampler_memory.py [--clips 10000000 --per-shard 1000 --batch 256 --world 8]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motion_data.read.sampler import Affinity, WeightedBatchSampler  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=10_000_000, help="clips in the split")
    ap.add_argument("--per-shard", type=int, default=1000, help="clips per shard")
    ap.add_argument("--batch", type=int, default=256, help="clips per batch")
    ap.add_argument("--world", type=int, default=8, help="ranks")
    args = ap.parse_args(argv)
    C = args.clips
    rows = np.arange(C, dtype=np.int64)
    weights = np.random.default_rng(0).random(C) + 0.05
    shard_of = (rows // args.per_shard).astype(np.int32)
    inputs = rows.nbytes + weights.nbytes + shard_of.nbytes
    print(f"{C:,} clips, {C // args.per_shard:,} shards, batch {args.batch}, {args.world} ranks; inputs (rows, "
          f"weights, shard codes) {inputs / 1e6:.0f} MB")
    for name, aff in (("exact", None), ("exact + shard_affinity", Affinity(shard_of, 16))):
        tracemalloc.start()
        t0 = time.perf_counter()
        s = WeightedBatchSampler(rows, weights, args.batch, seed=0, rank=0, world_size=args.world, affinity=aff)
        d = s.epoch_draw(0)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{name:<24} epoch draw {d.nbytes / 1e6:.0f} MB, peak allocated {peak / 1e6:.0f} MB "
              f"({peak / C:.0f} bytes/clip), {dt:.1f} s")
        del s, d


if __name__ == "__main__":
    main()
