"""Dataset figures before/after a static filter, and the threshold sweep of ``tune-filter``.

Two ways to the same numbers (docs/DESIGN.md "Dataset figures"):
- fast: from the score-binned class histograms in ``stats.zarr`` (``stats.shard_stats``),
  exact at thresholds that are multiples of ``HIST_BIN_WIDTH``; elsewhere the threshold
  acts as the lower edge of its bin;
- exact: ``ExactSweep`` from the per-clip scores in ``stats.zarr`` plus the labels of the
  shards, comparing ``score >= float32(threshold)`` as ``stats.keep_mask`` does.
Kept sets are nested in the threshold (a clip that falls back to its top ``min_keep``
points keeps a subset of its earlier dynamic set), so every class count is non-increasing
in the threshold, and ``fast(t + bw) <= exact(t) <= fast(t)`` class by class.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from motion_data.common import labels as L
from motion_data.build import stats as S

FIGURE_KEYS = ("dynamic_point_ratio", "center_prop", "perplexity_ratio", "class_counts")
CSV_COLUMNS = ("metric", "threshold", "min_keep", "dynamic_point_ratio", "center_prop", "perplexity_ratio",
               "meets_targets")
# The original plan's reference targets (its stage 4).
DEFAULT_TARGET_DYNAMIC = (0.45, 0.60)
DEFAULT_MAX_CENTER = 0.55
DEFAULT_MIN_PERPLEXITY = 0.10


# ---------------------------------------------------------------- figures
def figures(class_counts, kept_points: int, total_points: int, W: int) -> dict:
    """The four dataset figures of one label distribution (plus the point counts)."""
    cc = np.asarray(class_counts, np.int64)
    return {
        "dynamic_point_ratio": float(kept_points / total_points) if total_points else 0.0,
        "center_prop": L.center_prop(cc, W),
        "perplexity_ratio": L.perplexity_ratio(cc),
        "class_counts": [int(x) for x in cc],
        "kept_points": int(kept_points),
        "total_points": int(total_points),
    }


def before_after(points: np.ndarray, topk: np.ndarray, threshold: float, min_keep: int, W: int) -> dict:
    """``{"before", "after"}`` figures from one metric's histograms ("before" keeps every point)."""
    total = int(points[:, -1].sum())
    before = points.sum(axis=0)
    after, kept = S.filtered_counts_from_hist(points, topk, threshold, min_keep)
    return {"before": figures(before[:-1], total, total, W), "after": figures(after, kept, total, W)}


def score_hist_before_after(points: np.ndarray, topk: np.ndarray, threshold: float, min_keep: int):
    """Per-bin point counts of the metric's score, all points and kept points."""
    bt = S.threshold_bin(threshold)
    before = points[:, -1].astype(np.int64)
    after = before.copy()
    after[:bt] = topk[:bt, :min_keep, -1].sum(axis=1)
    return before, after


# ---------------------------------------------------------------- thresholds and targets
def threshold_range(start: float, stop: float, step: float) -> list[float]:
    """``start, start + step, ..., stop`` (stop inclusive, robust to float error)."""
    if step <= 0 or stop < start:
        raise ValueError("need step > 0 and stop >= start")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    # 0.01 + 6 * 0.005 is 0.04000000000000001; round so it lands on the bin edge it means
    return [round(start + i * step, 10) for i in range(n)]


def parse_range(spec: str, what: str = "threshold", nonnegative: bool = True) -> list[float]:
    """``"start:stop:step"`` (stop inclusive, robust to float error), ``"a,b,c"`` or ``"x"``;
    ``what`` names the values in errors."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            vals = threshold_range(start, stop, step)
        else:
            vals = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{what} range {spec!r} must look like 0.01:0.20:0.005 or 0.03,0.04 ({e})") from None
    if not vals or (nonnegative and min(vals) < 0):
        raise ValueError(f"{what} range {spec!r}: {what}s must be >= 0")
    return [round(v, 10) for v in vals]  # as threshold_range rounds


def parse_interval(spec: str | None) -> tuple[float, float] | None:
    """``"lo:hi"`` -> (lo, hi); ``"none"``/None -> None."""
    if spec is None or str(spec).lower() == "none":
        return None
    try:
        lo, hi = (float(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"interval {spec!r} must look like 0.45:0.60 (or 'none')") from None
    if lo > hi:
        raise ValueError(f"interval {spec!r}: low end above high end")
    return lo, hi


@dataclass
class Targets:
    """Target figures; a None field is not checked."""

    dynamic: tuple[float, float] | None = DEFAULT_TARGET_DYNAMIC
    max_center: float | None = DEFAULT_MAX_CENTER
    min_perplexity: float | None = DEFAULT_MIN_PERPLEXITY

    def shortfall(self, row: "TuneRow") -> float:
        """Sum of the amounts by which the row misses each target (0 = meets all).

        Every figure is a share in [0, 1], so the misses add up in one unit.
        """
        d = 0.0
        if self.dynamic is not None:
            lo, hi = self.dynamic
            d += max(0.0, lo - row.dynamic_point_ratio) + max(0.0, row.dynamic_point_ratio - hi)
        if self.max_center is not None:
            d += max(0.0, row.center_prop - self.max_center)
        if self.min_perplexity is not None:
            d += max(0.0, self.min_perplexity - row.perplexity_ratio)
        return d

    def __str__(self):
        parts = []
        if self.dynamic is not None:
            parts.append(f"dynamic_point_ratio in [{self.dynamic[0]:g}, {self.dynamic[1]:g}]")
        if self.max_center is not None:
            parts.append(f"center_prop <= {self.max_center:g}")
        if self.min_perplexity is not None:
            parts.append(f"perplexity_ratio >= {self.min_perplexity:g}")
        return ", ".join(parts) or "none"


@dataclass
class TuneRow:
    metric: str
    threshold: float
    min_keep: int
    dynamic_point_ratio: float
    center_prop: float
    perplexity_ratio: float
    meets_targets: bool = False
    kept_points: int = 0

    def csv_values(self) -> list:
        d = asdict(self)
        return [d[c] for c in CSV_COLUMNS]


def rows_from_counts(metric: str, thresholds, min_keep: int, counts: np.ndarray, total: int, W: int,
                     targets: Targets) -> list[TuneRow]:
    """Rows from ``counts`` ``(len(thresholds), W*W+1)`` (last column = kept points)."""
    rows = []
    for t, c in zip(thresholds, counts):
        f = figures(c[:-1], int(c[-1]), total, W)
        r = TuneRow(metric, float(t), int(min_keep), f["dynamic_point_ratio"], f["center_prop"],
                    f["perplexity_ratio"], kept_points=int(c[-1]))
        r.meets_targets = targets.shortfall(r) == 0.0
        rows.append(r)
    return rows


def sweep_counts_from_hist(points: np.ndarray, topk: np.ndarray, thresholds, min_keep: int) -> np.ndarray:
    """``(len(thresholds), W*W+1)`` kept counts; cumulative sums make each threshold O(W*W).

    Same answer as ``stats.filtered_counts_from_hist`` per threshold.
    """
    if min_keep > topk.shape[1]:
        raise ValueError(f"min_keep={min_keep} exceeds the {topk.shape[1]} ranks stored in the histograms; "
                         f"use --exact")
    nb, k1 = points.shape
    suffix = np.zeros((nb + 1, k1), np.int64)
    suffix[:nb] = np.cumsum(points[::-1], axis=0)[::-1]
    prefix = np.zeros((nb + 1, k1), np.int64)
    prefix[1:] = np.cumsum(topk[:, :min_keep].sum(axis=1), axis=0)
    bts = np.array([S.threshold_bin(t) for t in thresholds], np.int64)
    return suffix[bts] + prefix[bts]


def sweep_from_hist(hists: dict, metrics, thresholds, min_keep: int, W: int, targets: Targets) -> list[TuneRow]:
    """The fast sweep; ``hists[metric] = (points, topk)``."""
    rows = []
    for m in metrics:
        points, topk = hists[m]
        counts = sweep_counts_from_hist(points, topk, thresholds, min_keep)
        rows += rows_from_counts(m, thresholds, min_keep, counts, int(points[:, -1].sum()), W, targets)
    return rows


RECOMMENDATION_RULE = (
    "among rows meeting every target, the highest perplexity_ratio (ties: lower center_prop, then "
    "lower threshold); if none meets them, the smallest total shortfall (sum of the amounts by which "
    "the row misses each target, all figures being shares), ties: higher perplexity_ratio")


def recommend(rows: list[TuneRow], targets: Targets) -> tuple[int, str]:
    """Index of the recommended row and why (see ``RECOMMENDATION_RULE``)."""
    if not rows:
        raise ValueError("no rows to recommend from")
    meeting = [i for i, r in enumerate(rows) if r.meets_targets]
    if meeting:
        i = min(meeting, key=lambda i: (-rows[i].perplexity_ratio, rows[i].center_prop, rows[i].threshold))
        return i, f"meets all targets ({targets}) with the highest perplexity_ratio among {len(meeting)} such rows"
    i = min(range(len(rows)), key=lambda i: (targets.shortfall(rows[i]), -rows[i].perplexity_ratio))
    return i, (f"no row meets all targets ({targets}); closest by total shortfall "
               f"{targets.shortfall(rows[i]):.4f}")


# ---------------------------------------------------------------- exact recomputation
class ExactSweep:
    """Kept class counts for many thresholds from per-clip scores and per-step labels.

    Feed clips in chunks with ``add``; ``counts(metric)`` gives ``(len(thresholds), W*W+1)``
    (last column = kept points) in the order the thresholds were given. Per clip and metric a
    point is dynamic for the thresholds up to its score; the clip uses its dynamic set while at
    least ``min_keep`` points are dynamic, i.e. below the threshold index of its
    ``min_keep``-th largest score, and its top ``min_keep`` points (``stats.keep_mask``) from
    there on. Both parts are scattered into per-threshold buckets with ``bincount`` and summed
    with one cumulative sum, so a chunk costs O(labels) whatever the number of thresholds.
    """

    def __init__(self, metrics, thresholds, min_keep: int, W: int):
        self.metrics = list(metrics)
        self.thresholds = np.asarray(thresholds, np.float64)
        self.th32 = self.thresholds.astype(np.float32)
        self.order = np.argsort(self.th32, kind="stable")
        self.sorted = self.th32[self.order]
        self.min_keep = int(min_keep)
        self.W = W
        self.K = W * W
        J = len(self.sorted)
        self.dyn = {m: np.zeros((J + 1) * (self.K + 1), np.int64) for m in self.metrics}
        self.top = {m: np.zeros((J + 1) * (self.K + 1), np.int64) for m in self.metrics}
        self.total_points = 0

    def add(self, scores: dict, valid_count: np.ndarray, labels: np.ndarray, valid: np.ndarray):
        """scores[metric] ``(B, N)``; valid_count ``(B, N)``; labels, valid ``(B, S, N)``."""
        B, N = valid_count.shape
        J, K1 = len(self.sorted), self.K + 1
        self.total_points += B * N
        b_idx, _, n_idx = np.nonzero(valid)
        lab = labels[valid].astype(np.int64)
        for m in self.metrics:
            s = np.ascontiguousarray(scores[m], np.float32)
            jn = np.searchsorted(self.sorted, s, side="right")  # dynamic for threshold index < jn
            k = self.min_keep
            if k == 0:
                jstar = np.full(B, J, np.int64)
            elif k > N:
                jstar = np.zeros(B, np.int64)
            else:
                jstar = np.partition(jn, N - k, axis=1)[:, N - k]
            mcap = np.minimum(jn, jstar[:, None])
            self.dyn[m] += np.bincount(np.concatenate([mcap[b_idx, n_idx] * K1 + lab, mcap.ravel() * K1 + self.K]),
                                       minlength=(J + 1) * K1)
            top = S.keep_mask(s, valid_count, np.inf, k) & (jstar < J)[:, None]
            sel = top[b_idx, n_idx]
            tb, tn = np.nonzero(top)
            self.top[m] += np.bincount(np.concatenate([jstar[b_idx[sel]] * K1 + lab[sel], jstar[tb] * K1 + self.K]),
                                       minlength=(J + 1) * K1)

    def counts(self, metric: str) -> np.ndarray:
        J, K1 = len(self.sorted), self.K + 1
        dyn = self.dyn[metric].reshape(J + 1, K1)
        top = self.top[metric].reshape(J + 1, K1)
        # dynamic part at index j: points whose cap is > j; top-k part: clips whose jstar <= j
        dyn_at = np.cumsum(dyn[::-1], axis=0)[::-1][1:]
        top_at = np.cumsum(top, axis=0)[:J]
        out = np.empty((J, K1), np.int64)
        out[self.order] = dyn_at + top_at
        return out

    def rows(self, targets: Targets) -> list[TuneRow]:
        out = []
        for m in self.metrics:
            out += rows_from_counts(m, self.thresholds, self.min_keep, self.counts(m), self.total_points, self.W,
                                    targets)
        return out


def exact_from_build(build: str | Path, metrics, thresholds, min_keep: int, chunk: int = 256,
                     progress: bool = True) -> ExactSweep:
    """Recompute the sweep from ``stats.zarr`` scores and the shards' labels (manifest offsets)."""
    from tqdm import tqdm

    from motion_data.build.folder import BuildDir
    from motion_data.read.shard_reader import read_sample
    from motion_data.common.errors import DataError

    b = BuildDir(build)
    g, W, N, C = b.store, b.W, b.N, b.n_clips
    ref_size, rule = b.ref_size, b.label_rule  # the build's label rule
    man = b.manifest(["clip_id", "shard", "offset", "size", "checksum"])
    build = b.root
    acc = ExactSweep(metrics, thresholds, min_keep, W)
    bar = tqdm(total=C, desc="exact pass", unit="clip", disable=not progress)
    for lo in range(0, C, chunk):
        hi = min(C, lo + chunk)
        scores = {m: np.asarray(g[f"stats/{m}"][lo:hi]) for m in metrics}
        vc = np.asarray(g["stats/valid_count"][lo:hi])
        labs, valids = [], []
        for i in range(lo, hi):
            shard = build / man["shard"][i]
            smp = read_sample(shard, man["offset"][i], man["size"][i], man["clip_id"][i], man["checksum"][i])
            if smp["pos"].shape[1] != N:
                raise DataError(f"{shard} ({man['clip_id'][i]}): {smp['pos'].shape[1]} points, stats.zarr says {N}")
            labs.append(L.labels_from_positions(smp["pos"], W, ref_size, rule))
            valids.append(L.step_valid(smp["vis"]))
        acc.add(scores, vc, np.stack(labs), np.stack(valids))
        bar.update(hi - lo)
    bar.close()
    return acc
