"""tune-filter on a 1M-clip store: one sweep of 3 metrics x 100 thresholds, and dynamic_ratio.

    python benchmarks/bench_tune.py [--clips 1000000] [--store DIR] [--keep]

Builds (once; reused while --store holds one of the same size) a real stats.zarr of --clips
clips x 400 points with synthetic per-point scores, written in chunks in the binding
layout (uncompressed); its histograms are binned from those 1M clips' scores (point counts
and per-clip ranks as the build counts them; the label columns drawn from a centre-heavy model, since the sweep
costs the same whatever they hold). Then times, side by side:
- opening the store + the histogram sweep (3 metrics x 100 thresholds) + the recommendation,
  and the same through the ``tune-filter`` command in-process (target: < 1 s);
- ``stats.dynamic_ratio`` over all clips x 400 points (the sampler's need) against a plain
  numpy expression of the same rule.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import time
from pathlib import Path

import numba
import numpy as np

from motion_data.inspect import analysis as A
from motion_data.common import labels as L
from motion_data.build import stats as S
from motion_data.common import static_filter as SF
from motion_data.build.folder import BuildDir
from motion_data.build import store as ST
from motion_data.build.stats import _top_ranks
from motion_data.common.errors import DataError

N = 400
W = L.DEFAULT_W


def synth_scores(rng, C):
    """Per-point stats of C clips: mostly static points, some movers, a few never visible."""
    u, v, w = (rng.random((C, N), dtype=np.float32) for _ in range(3))
    p95 = np.where(u < 0.6, 0.03 * v * v, np.where(u < 0.7, 0.01 + 0.05 * v, 0.03 + 0.57 * v))
    vc = np.where(w < 0.03, 0, 15).astype(np.uint8)
    p95 = np.where(vc > 0, p95, 0).astype(np.float32)
    return {"p95": p95, "mean": (p95 * (0.5 + 0.5 * w)).astype(np.float32),
            "max": np.minimum(p95 * (1.3 - 0.3 * w), np.float32(np.sqrt(2))).astype(np.float32),
            "valid_count": vc, "center_count": np.where(p95 < 0.02, vc, 2).astype(np.uint8)}


@numba.njit(cache=True, parallel=True)
def _rank_bins(scores, vc, bins, R, out):
    """out[c, r] = bin of clip c's rank-r point (stats._top_ranks: by score, ties to the lower
    index, among points with a valid step), -1 where the clip has fewer such points."""
    C, N_ = scores.shape
    for c in numba.prange(C):
        top = np.empty(R, np.int64)
        rank = np.empty(N_, np.int64)
        _top_ranks(scores[c], vc[c], R, top, rank)
        for r in range(R):
            out[c, r] = -1
        for n in range(N_):
            if rank[n] >= 0:
                out[c, rank[n]] = bins[c, n]


def add_hist_counts(counts, scores, vc):
    """Point counts per score bin (``points``) and per (bin, rank) (``topk``), as the build counts them."""
    pts, top = counts
    R = S.HIST_RANK_MAX
    b = S.score_bin(scores)
    pts += np.bincount(b.ravel(), minlength=S.HIST_NBINS)
    rb = np.empty((scores.shape[0], R), np.int64)
    _rank_bins(scores, vc, b, R, rb)
    idx = rb * R + np.arange(R)
    top += np.bincount(idx[rb >= 0], minlength=S.HIST_NBINS * R).reshape(S.HIST_NBINS, R)


def label_columns(n_points, rng):
    """Label counts for ``n_points`` per bin: centre share falling with the bin's score."""
    ring = L.ring_map(W)
    score = S.HIST_EDGES.astype(np.float64) + S.HIST_BIN_WIDTH / 2
    centre = np.clip(0.97 - 4 * score, 0.05, 0.97)
    w = np.exp(-ring[None, :] / (0.5 + 20 * score[:, None])) * (ring[None, :] > 0)
    p = w / w.sum(1, keepdims=True) * (1 - centre[:, None])
    p[:, L.center_class(W)] = centre
    labels = n_points[..., None] * 14.0 * (p if n_points.ndim == 1 else p[:, None, :])
    return np.rint(labels * rng.uniform(0.9, 1.1, labels.shape)).astype(np.int64)


def build_store(path: Path, C: int, chunk: int, seed=0):
    """Write the store in the binding layout with zarr directly, uncompressed: random
    float scores do not compress, and zstd would make building 1M clips take minutes."""
    import zarr

    rng = np.random.default_rng(seed)
    attrs = ST.store_attrs(W=W, ref_size=L.DEFAULT_REF_SIZE, T=16, N=N, build_filter=SF.StaticFilter(enable=True),
                           n_clips=C, label_rule=L.DEFAULT_LABEL_RULE)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (".tmp-" + ST.STORE_NAME)
    g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    arrays = {k: g.create_array(f"stats/{k}", shape=(C, N), dtype="float32" if k in SF.METRICS else "uint8",
                                chunks=(min(C, ST.CHUNK_ROWS), N), compressors=None) for k in ST.PER_CLIP}
    counts = {m: (np.zeros(S.HIST_NBINS, np.int64), np.zeros((S.HIST_NBINS, S.HIST_RANK_MAX), np.int64))
              for m in SF.METRICS}
    for lo in range(0, C, chunk):
        rows = synth_scores(rng, min(chunk, C - lo))
        for k in ST.PER_CLIP:
            arrays[k][lo:lo + len(rows[k])] = rows[k]
        for m in SF.METRICS:
            add_hist_counts(counts[m], rows[m], rows["valid_count"])
    for m in SF.METRICS:
        pts, top = counts[m]
        g.create_array(f"hist/{m}/points", data=np.concatenate([label_columns(pts, rng), pts[:, None]], axis=1))
        g.create_array(f"hist/{m}/topk", data=np.concatenate([label_columns(top, rng), top[..., None]], axis=2))
    g.create_array("label_ring", data=L.ring_map(W))
    g.attrs.update(attrs)
    ST.replace_dir(tmp, path / ST.STORE_NAME)


def numpy_dynamic_ratio(scores, vc, flt):
    nd = (scores >= np.float32(flt.threshold)).sum(1)
    nv = (vc > 0).sum(1)
    return (np.where(nd >= flt.min_keep, nd, np.minimum(flt.min_keep, nv)) / scores.shape[1]).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=1_000_000, help="clips in the store")
    ap.add_argument("--store", default="/tmp/bench_tune_build", help="build folder to create or reuse")
    ap.add_argument("--chunk", type=int, default=50_000, help="clips generated per chunk while building")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    a = ap.parse_args()

    out = Path(a.store)
    try:
        attrs = ST.read_attrs(out / ST.STORE_NAME)
        reuse = attrs["n_clips"] == a.clips
    except (DataError, KeyError, FileNotFoundError):
        reuse = False
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        build_store(out, a.clips, a.chunk)
        print(f"built {out}/stats.zarr with {a.clips} clips x {N} points in {time.perf_counter() - t0:.1f} s "
              f"(not part of the timing)")
    else:
        print(f"reusing {out}/stats.zarr ({a.clips} clips)")
    du = sum(f.stat().st_size for f in (out / ST.STORE_NAME).rglob("*") if f.is_file())
    print(f"store size {du / 2**30:.2f} GiB; numba threads {numba.get_num_threads()}")

    metrics = list(SF.METRICS)
    thresholds = A.parse_range("0.005:0.5:0.005")
    assert len(thresholds) == 100
    targets = A.Targets()
    S.keep_mask(np.zeros((1, 4), np.float32), np.ones((1, 4), np.uint8), 0.1, 1)  # load kernel caches

    t0 = time.perf_counter()
    hists = BuildDir(out).histograms(metrics)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = A.sweep_from_hist(hists, metrics, thresholds, 16, W, targets)
    rec, why = A.recommend(rows, targets)
    t_sweep = time.perf_counter() - t0
    # baseline: one filtered_counts_from_hist call per (metric, threshold)
    t0 = time.perf_counter()
    for m in metrics:
        for t in thresholds:
            S.filtered_counts_from_hist(*hists[m], t, 16)
    t_naive = time.perf_counter() - t0
    from preprocess.__main__ import main as cli

    t_cli = []
    for _ in range(2):  # the first call also imports every command module of the dispatcher
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli(["tune-filter", str(out), "--metrics", "p95,mean,max", "--thresholds", "0.005:0.5:0.005"])
        t_cli.append(time.perf_counter() - t0)
        assert rc == 0
    r = rows[rec]
    print(f"sweep of {len(metrics)} metrics x {len(thresholds)} thresholds = {len(rows)} rows on {attrs['n_clips']} clips")
    print(f"{'step':52s} {'seconds':>9s}")
    print(f"{'open store + read histograms':52s} {t_open:9.4f}")
    print(f"{'sweep (cumulative sums) + recommendation':52s} {t_sweep:9.4f}")
    print(f"{'  total (target < 1 s)':52s} {t_open + t_sweep:9.4f}")
    print(f"{'baseline: filtered_counts_from_hist per row':52s} {t_naive:9.4f}")
    print(f"{'tune-filter command in-process, first call':52s} {t_cli[0]:9.4f}")
    print(f"{'tune-filter command in-process, second call':52s} {t_cli[1]:9.4f}")
    print(f"recommended {r.metric}@{r.threshold:g}: dynamic {r.dynamic_point_ratio:.3f} center {r.center_prop:.3f} "
          f"perplexity {r.perplexity_ratio:.3f} ({why})")

    t0 = time.perf_counter()
    st = ST.read_stats(out / ST.STORE_NAME, names=("p95", "valid_count"))
    t_read = time.perf_counter() - t0
    flt = SF.StaticFilter(enable=True, metric="p95", threshold=0.04, min_keep=16)
    S.dynamic_ratio(st["p95"][:10], st["valid_count"][:10], flt)
    t0 = time.perf_counter()
    dr = S.dynamic_ratio(st["p95"], st["valid_count"], flt)
    t_dr = time.perf_counter() - t0
    t0 = time.perf_counter()
    dr_np = numpy_dynamic_ratio(st["p95"], st["valid_count"], flt)
    t_dr_np = time.perf_counter() - t0
    assert np.array_equal(dr, dr_np)
    C = st["p95"].shape[0]
    print(f"dynamic_ratio over {C} clips x {N} points (p95@0.04, min_keep 16):")
    print(f"{'  read stats/p95 + stats/valid_count from the store':52s} {t_read:9.4f}")
    print(f"{'  stats.dynamic_ratio (numba)':52s} {t_dr:9.4f}")
    print(f"{'  numpy expression of the same rule':52s} {t_dr_np:9.4f}  ({t_dr_np / t_dr:.1f}x the kernel's time)")
    print(f"  mean dynamic ratio {dr.mean():.3f}")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
