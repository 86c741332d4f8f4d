"""build-shards end to end from track files (tracking excluded): clips/s with 1 and 2 workers
of the local pool and, with ``--ray 1,2``, of ``--executor ray`` on a local Ray of 1 and 2 CPUs
(its start, ``ray.init``, is timed apart; the Ray build loads every input twice: once to
count its clips for the plan, once to write its shards).

Writes CoTracker-style .npz files (N = 400 points, 20x20 grid) to a temporary folder, builds
them once per worker count (each in a fresh interpreter, as the CLI runs) into fresh folders and prints the figures side by side.
Target (issue #2): >= 2,000 clips/s on 2 cores.

    python benchmarks/bench_build.py [--files 48 --seqs 8 --frames 96 --maxcount 500]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np



def write_inputs(d: Path, files: int, seqs: int, frames: int, grid: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.linspace(8, 248, grid), np.linspace(8, 184, grid))
    base = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
    N = base.shape[0]
    for f in range(files):
        tr = np.broadcast_to(base, (seqs, frames, N, 2)).copy()
        tr += rng.normal(0, 0.05, tr.shape).astype(np.float32)
        mov = rng.random((seqs, 1, N, 1)) < 0.3
        tr += mov * np.cumsum(rng.normal(0, 1.5, (seqs, frames, 1, 2)), 1).astype(np.float32)
        vis = rng.random((seqs, frames, N)) > 0.02
        np.savez(d / f"video_{f:04d}.npz", tracks=tr, visibility=vis, image_size=np.array([192, 256]))


def _one_build(inp: str, out: str, maxcount: int, workers: int, executor: str = "local") -> None:
    """Runs in a fresh interpreter, as the CLI would: prints seconds and clip count."""
    import resource

    from motion_data.build.build_shards import build
    from motion_data.build.setup import Options

    if executor == "ray":
        import ray

        from motion_data.build.ray_exec import ray_build

        t = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter() - t
        t = time.perf_counter()
        s = ray_build([inp], out, Options(maxcount=maxcount), progress=False)
        print(json.dumps({"seconds": time.perf_counter() - t, "cpu": None, "clips": s["clips"], "shards": s["shards"],
                          "start": start}))
        ray.shutdown()
        return

    def cpu():
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    t, c = time.perf_counter(), cpu()
    s = build([inp], out, Options(maxcount=maxcount), workers=workers, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c, "clips": s["clips"],
                      "shards": s["shards"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=48, help="track files to generate")
    ap.add_argument("--seqs", type=int, default=8, help="sequences per file")
    ap.add_argument("--frames", type=int, default=96, help="frames per sequence")
    ap.add_argument("--maxcount", type=int, default=500, help="clips per shard")
    ap.add_argument("--workers", default="1,2", help="worker counts of the local pool to compare")
    ap.add_argument("--ray", default="", help="CPU counts of a local Ray to compare (e.g. 1,2; needs the [ray] extra)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        inp = root / "in"
        inp.mkdir()
        write_inputs(inp, args.files, args.seqs, args.frames)
        rows = []
        runs = [("local", int(x)) for x in args.workers.split(",")] + \
            [("ray", int(x)) for x in args.ray.split(",") if x]
        for ex, w in runs:
            out = root / f"out_{ex}{w}"
            # a fresh interpreter per run, like the CLI (the pool start is part of the cost)
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_build; "
                    f"bench_build._one_build({str(inp)!r}, {str(out)!r}, {args.maxcount}, {w}, {ex!r})")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append((f"{ex} {w}", d["clips"], d["shards"], d["seconds"], d["clips"] / d["seconds"], d["cpu"],
                         d.get("start")))
            shutil.rmtree(out)
        print(f"build-shards from track files: {args.files} files x {args.seqs} seqs x {args.frames} frames, "
              f"N=400, window 16 / stride 8, maxcount {args.maxcount}, {os.cpu_count()} CPUs visible, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'executor':>9} {'clips':>7} {'shards':>7} {'wall s':>7} {'clips/s':>8} {'vs local 1':>11} "
              f"{'CPU s':>7} {'clips/CPU-s':>12}")
        for w, c, sh, dt, rate, cs, start in rows:
            cpu = f"{cs:>7.2f} {c / cs:>12.0f}" if cs is not None else f"{'-':>7} {'-':>12}   ray.init {start:.1f} s"
            print(f"{w:>9} {c:>7} {sh:>7} {dt:>7.2f} {rate:>8.0f} {rate / rows[0][4]:>10.2f}x " + cpu)
        print("target: >= 2000 clips/s on 2 cores (time inside build(), interpreter start excluded). "
              "CPU s = user+sys of the build process and its workers: on a shared, loaded machine "
              "clips/CPU-s x cores is the throughput the same work reaches on idle cores.")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
