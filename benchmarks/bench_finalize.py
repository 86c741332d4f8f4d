"""The finalize step of a big build (stats.zarr, manifest.parquet, build.json from the shard
records): wall time and peak memory at a given number of clips, on fabricated records.

One real shard of ``--per-shard`` clips (N = 400, synthetic tracks) is planned and written,
then its record is copied ``--shards`` times (each copy naming its own inputs, so clip ids
stay unique) and its shard hard-linked beside it; ``finalize`` runs in a fresh interpreter.
Shard bytes are not read by finalize, so the copies cost no disk.

    python benchmarks/bench_finalize.py --shards 100 [--per-shard 1000]   # 10^5 clips
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def fabricate(root: Path, shards: int, per_shard: int) -> Path:
    from bench_build import write_inputs
    from motion_data.build import plan as P
    from motion_data.build.setup import WORK, Options

    inp = root / "in"
    inp.mkdir()
    files = -(-per_shard // 88)  # 8 sequences x 11 windows per file
    write_inputs(inp, files, 8, 96)
    out = root / "build"
    plan = P.make_plan([str(inp)], out, Options(maxcount=per_shard))
    P.run_task(out, 0, len(plan["shards"]))  # every shard of the real inputs; shard 0 is copied
    work = out / WORK
    for p in work.glob("rec-*.npz"):
        if p.name != "rec-000000.npz":
            p.unlink()
    for p in (out / "shards").iterdir():
        if p.name != "shard-000000.tar":
            p.unlink()
    with np.load(work / "rec-000000.npz") as z:
        rec = {k: z[k] for k in z.files}
    F = len(plan["names"])
    for k in range(1, shards):
        np.savez(work / f"rec-{k:06d}.npz", **{**rec, "input": rec["input"] + k * F})
        os.link(out / "shards" / "shard-000000.tar", out / "shards" / f"shard-{k:06d}.tar")
    rep = lambda xs, f: [f(k, x) for k in range(shards) for x in xs]  # noqa: E731
    plan["names"] = rep(plan["names"], lambda k, x: f"v{k:05d}/{x}")
    plan["sources"] = rep(plan["sources"], lambda k, x: x)
    plan["in_stats"] = rep(plan["in_stats"], lambda k, x: x)
    plan["global_index"] = list(range(len(plan["names"])))
    plan["inputs"] = rep(plan["inputs"], lambda k, x: {**x, "j": x["j"] + k * F})
    plan["shards"] = [plan["shards"][0]] * shards
    (work / P.PLAN).write_text(json.dumps(plan))
    return out


def _finalize(out: str) -> None:
    import resource

    from motion_data.build.plan import finalize_plan, read_plan

    t = time.perf_counter()
    plan = read_plan(out)  # what every task reads first
    plan_s, n_inputs = time.perf_counter() - t, len(plan["inputs"])
    del plan
    t = time.perf_counter()
    s = finalize_plan(out)
    print(json.dumps({"seconds": time.perf_counter() - t, "clips": s["clips"], "plan_s": plan_s, "inputs": n_inputs,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100, help="records (shards) to fabricate")
    ap.add_argument("--per-shard", type=int, default=1000, help="clips per shard")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_finalize_", dir=os.environ.get("TMPDIR")))
    try:
        t = time.perf_counter()
        out = fabricate(root, args.shards, args.per_shard)
        made = time.perf_counter() - t
        plan_mb = (out / ".work" / "plan.json").stat().st_size / 1e6
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_finalize as b; b._finalize({str(out)!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        d = json.loads(r.stdout.strip().splitlines()[-1])
        store = sum(p.stat().st_size for p in (out / "stats.zarr").rglob("*") if p.is_file())
        man = (out / "manifest.parquet").stat().st_size
        print(f"finalize of {d['clips']:,} clips ({args.shards} records of {args.per_shard}, N=400): "
              f"{d['seconds']:.1f} s, {d['clips'] / d['seconds']:,.0f} clips/s, peak RSS {d['peak_rss_mb']:.0f} MB; "
              f"stats.zarr {store / 1e6:.0f} MB, manifest {man / 1e6:.1f} MB; {os.cpu_count()} cores, load "
              f"{os.getloadavg()[0]:.1f} (records made in {made:.0f} s); the plan ({plan_mb:.1f} MB, {d['inputs']:,} inputs, "
              f"{args.shards} shards) read in {d['plan_s']:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
