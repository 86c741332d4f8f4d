"""Per-point statistics: numba kernel vs numpy reference vs the old per-clip torch.quantile loop.

    python benchmarks/bench_stats.py [--clips 100000] [--chunk 2500] [--slow-clips 2000]

All three compute mean/p95/max of ||v_norm|| over the valid steps of each point (plus the
kernel's centre count) on clips of 15 steps x 400 points with ~10% masked steps. The kernel
runs over all --clips; the two baselines are timed on --slow-clips of the same data and
reported as clips/s (a rate does not depend on how many clips it was measured on). Data is
generated once as a small pool of chunks that the timed loop cycles through, so memory stays
at a few hundred MB and generation is not timed.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from motion_data import labels as L
from motion_data import stats as S


def make_chunk(rng, C, S_=15, N=400):
    """Positions (C, S_+1, N, 2) and visibility (C, S_+1, N), what the kernels take."""
    kind = rng.choice(3, size=(C, 1, N, 1), p=[0.6, 0.3, 0.1]).astype(np.float32)
    scale = np.choose(kind.astype(np.int64), [0.05, 1.0, 4.0]).astype(np.float32)
    vel = rng.standard_normal((C, S_, N, 2), dtype=np.float32) * scale
    start = rng.uniform(0, 128, (C, 1, N, 2)).astype(np.float32)
    pos = np.concatenate([start, start + np.cumsum(vel, axis=1)], axis=1)
    vis = rng.random((C, S_ + 1, N), dtype=np.float32) < 0.95
    return pos, vis


def numpy_reference(pos, vis, W=L.DEFAULT_W):
    """np.nanquantile over the step axis with masked steps as NaN, as vectorised as numpy goes."""
    vel, valid = L.velocities(pos), L.step_valid(vis)
    speed = np.linalg.norm(L.normalize(vel, W), axis=-1)
    sp = np.where(valid, speed, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN points -> 0 below
            out = {"mean": np.nanmean(sp, axis=1), "p95": np.nanquantile(sp, 0.95, axis=1), "max": np.nanmax(sp, axis=1)}
    out = {k: np.nan_to_num(v, nan=0.0).astype(np.float32) for k, v in out.items()}
    out["center_count"] = ((L.labels_from_positions(pos, W) == L.center_class(W)) & valid).sum(axis=1).astype(np.uint8)
    return out


def numpy_sorted(pos, vis, W=L.DEFAULT_W):
    """The fastest plain-numpy form we know: one sort along steps (masked = +inf), p95 by
    numpy's linear interpolation gathered with take_along_axis. A fairer baseline than
    nanquantile."""
    vel, valid = L.velocities(pos), L.step_valid(vis)
    speed = np.linalg.norm(L.normalize(vel, W), axis=-1)
    k = valid.sum(axis=1)
    srt = np.sort(np.where(valid, speed, np.inf), axis=1)
    rank = 0.95 * np.maximum(k - 1, 0)
    lo = np.floor(rank).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(k - 1, 0))
    a = np.take_along_axis(srt, lo[:, None], axis=1)[:, 0]
    b = np.take_along_axis(srt, hi[:, None], axis=1)[:, 0]
    has = k > 0
    p95 = np.where(has, a + (rank - lo) * (b - a), 0.0)
    mean = np.where(valid, speed, 0).sum(axis=1) / np.maximum(k, 1)
    mx = np.where(has, np.take_along_axis(srt, np.maximum(k - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    cc = ((L.labels_from_positions(pos, W) == L.center_class(W)) & valid).sum(axis=1).astype(np.uint8)
    return {"mean": mean.astype(np.float32), "p95": p95.astype(np.float32), "max": mx.astype(np.float32),
            "center_count": cc}


def torch_loop(pos, vis, W=L.DEFAULT_W):
    """The old code's way: one torch.quantile call per clip (nanquantile for the mask)."""
    import torch

    vel, valid = L.velocities(pos), L.step_valid(vis)
    out = np.empty((vel.shape[0], vel.shape[2]), np.float32)
    for c in range(vel.shape[0]):
        v = torch.from_numpy(vel[c]) / ((W - 1) / 2)
        sp = torch.linalg.vector_norm(v.clamp(-1, 1), dim=-1)
        sp = torch.where(torch.from_numpy(valid[c]), sp, torch.tensor(float("nan")))
        out[c] = torch.nan_to_num(torch.nanquantile(sp, 0.95, dim=0), nan=0.0).numpy()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=100_000, help="clips through the kernel")
    ap.add_argument("--chunk", type=int, default=2500, help="clips per chunk")
    ap.add_argument("--pool", type=int, default=4, help="distinct chunks generated and cycled")
    ap.add_argument("--slow-clips", type=int, default=2000, help="clips timed for each baseline")
    a = ap.parse_args()
    import numba
    import torch

    rng = np.random.default_rng(0)
    pool = [make_chunk(rng, a.chunk) for _ in range(a.pool)]
    print(f"clips of 15 steps x 400 points, chunks of {a.chunk}; cores {os.cpu_count()}, "
          f"numba threads {numba.get_num_threads()}, torch threads {torch.get_num_threads()}")

    S.point_stats(*[x[:2] for x in pool[0]])  # compile / load the cache outside the timing
    n_chunks = -(-a.clips // a.chunk)
    t0 = time.perf_counter()
    for i in range(n_chunks):
        S.point_stats(*pool[i % a.pool])
    t_kernel = time.perf_counter() - t0
    kernel_rate = n_chunks * a.chunk / t_kernel

    # baselines: same chunks, fewer clips; and a correctness check against the kernel
    pos, vis = pool[0]
    n_slow = min(a.slow_clips, a.chunk * a.pool)
    t0 = time.perf_counter()
    done = 0
    ref = None
    while done < n_slow:
        v, m = pool[(done // a.chunk) % a.pool]
        k = min(a.chunk, n_slow - done)
        r = numpy_reference(v[:k], m[:k])
        ref = r if ref is None else ref
        done += k
    t_np = time.perf_counter() - t0
    np_rate = n_slow / t_np

    t0 = time.perf_counter()
    done = 0
    while done < n_slow:
        v, m = pool[(done // a.chunk) % a.pool]
        k = min(a.chunk, n_slow - done)
        rs = numpy_sorted(v[:k], m[:k])
        done += k
    t_sort = time.perf_counter() - t0
    sort_rate = n_slow / t_sort
    err_s = max(float(np.abs(rs[m_][:k] - ref[m_][:k]).max()) for m_ in S.METRICS)

    n_torch = min(n_slow, a.chunk)
    t0 = time.perf_counter()
    tq = torch_loop(pos[:n_torch], vis[:n_torch])
    t_torch = time.perf_counter() - t0
    torch_rate = n_torch / t_torch

    ks = S.point_stats(pos[:n_torch], vis[:n_torch])
    err = max(float(np.abs(ks[m] - ref[m][:n_torch]).max()) for m in S.METRICS)
    err_t = float(np.abs(ks["p95"] - tq).max())
    cc_ok = bool((ks["center_count"] == ref["center_count"][:n_torch]).all())

    print(f"{'method':38s} {'clips':>8s} {'seconds':>9s} {'clips/s':>11s} {'kernel speed-up':>16s}")
    print(f"{'numba kernel (point_stats)':38s} {n_chunks * a.chunk:8d} {t_kernel:9.2f} {kernel_rate:11.0f} {'1.0x':>16s}")
    print(f"{'numpy reference (np.nanquantile)':38s} {n_slow:8d} {t_np:9.2f} {np_rate:11.0f} "
          f"{kernel_rate / np_rate:15.1f}x")
    print(f"{'numpy vectorised sort (fairer)':38s} {n_slow:8d} {t_sort:9.2f} {sort_rate:11.0f} "
          f"{kernel_rate / sort_rate:15.1f}x")
    print(f"{'per-clip torch.nanquantile loop':38s} {n_torch:8d} {t_torch:9.2f} {torch_rate:11.0f} "
          f"{kernel_rate / torch_rate:15.1f}x")
    print(f"max |kernel - numpy| over mean/p95/max: {err:.2e}; |kernel - torch| p95: {err_t:.2e}; "
          f"centre counts equal: {cc_ok}")
    print(f"|numpy sort - numpy reference|: {err_s:.2e}")
    print(f"target >= 20x the numpy reference: {'met' if kernel_rate / np_rate >= 20 else 'NOT met'} "
          f"(vs the sort form: {kernel_rate / sort_rate:.1f}x)")


if __name__ == "__main__":
    main()
