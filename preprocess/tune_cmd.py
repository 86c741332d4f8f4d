"""Sweep static-filter thresholds and recommend one.

For each metric and threshold prints dynamic_point_ratio, center_prop and perplexity_ratio of
the kept points' labels, whether they meet the targets, and recommends one row:
among rows meeting every target, the one with the highest perplexity_ratio (ties: lower
center_prop, then lower threshold); if no row meets them, the row with the smallest total
shortfall -- the sum of the amounts by which it misses each target (all figures are shares,
so the misses add up in one unit) -- ties broken by higher perplexity_ratio.

The fast answer comes from the score-binned histograms in BUILD/stats.zarr and is exact at
thresholds that are multiples of the bin width (0.0025); a threshold between two edges acts
as the lower edge. --exact recomputes from the per-clip scores and the labels in the shards
(one pass, with a progress bar); it agrees with the fast answer at bin edges and lies
between the fast answers of the neighbouring edges elsewhere. Ranges are start:stop:step
with stop inclusive, or comma lists.
"""
from __future__ import annotations

from motion_data.common.errors import UserError

import csv
from pathlib import Path

from motion_data.common.atomic import atomic_open
from motion_data.inspect import analysis as A
from motion_data.build.folder import BuildDir
from motion_data.build import stats as S
from motion_data.common import static_filter as SF
from motion_data.inspect.tables import print_sweep


def _float_or_none(s):
    return None if str(s).lower() == "none" else float(s)


def add_arguments(p):
    p.add_argument("build", metavar="BUILD", help="build folder written by build-shards (holds stats.zarr)")
    p.add_argument("--metrics", default="p95,mean,max", help="comma list of mean|p95|max (default: %(default)s)")
    p.add_argument("--thresholds", default="0.01:0.20:0.005",
                   help="thresholds as start:stop:step (stop inclusive) or a comma list (default: %(default)s)")
    p.add_argument("--min-keep", type=int, default=SF.DEFAULT_FILTER.min_keep,
                   help="points kept per clip when fewer pass the threshold (default: %(default)s; above "
                        f"{S.HIST_RANK_MAX} needs --exact)")
    p.add_argument("--target-dynamic", default="%g:%g" % A.DEFAULT_TARGET_DYNAMIC,
                   help="target interval LO:HI of dynamic_point_ratio, or 'none' (default: %(default)s, the "
                        "target of the original staged plan this project implements)")
    p.add_argument("--max-center", type=_float_or_none, default=A.DEFAULT_MAX_CENTER,
                   help="target upper bound of center_prop, or 'none' (default: %(default)s)")
    p.add_argument("--min-perplexity", type=_float_or_none, default=A.DEFAULT_MIN_PERPLEXITY,
                   help="target lower bound of perplexity_ratio, or 'none' (default: %(default)s)")
    p.add_argument("--csv", metavar="F", help=f"write the rows to F with columns {','.join(A.CSV_COLUMNS)}")
    p.add_argument("--plot", metavar="P", help="write a PNG of the three figures against the threshold to P")
    p.add_argument("--exact", action="store_true",
                   help="recompute from per-clip scores + shard labels instead of the histograms (slow, exact)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar of --exact")


def _write_csv(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(A.CSV_COLUMNS)
        for r in rows:
            v = r.csv_values()
            w.writerow([v[0], f"{v[1]:g}", v[2]] + [f"{x:.6f}" for x in v[3:6]] + [str(v[6]).lower()])


def run(args) -> int:
    try:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in metrics if m not in SF.METRICS]
        if bad or not metrics:
            raise ValueError(f"--metrics {args.metrics!r}: each must be one of {', '.join(SF.METRICS)}")
        thresholds = A.parse_range(args.thresholds)
        if args.min_keep < 0:
            raise ValueError(f"--min-keep must be >= 0, got {args.min_keep}")
        if not args.exact and args.min_keep > S.HIST_RANK_MAX:
            raise ValueError(f"--min-keep {args.min_keep} exceeds the {S.HIST_RANK_MAX} ranks stored in the "
                             f"histograms; use --exact")
        targets = A.Targets(A.parse_interval(args.target_dynamic), args.max_center, args.min_perplexity)
        build = BuildDir(args.build)
        W = build.W
        if args.exact:
            acc = A.exact_from_build(args.build, metrics, thresholds, args.min_keep, progress=not args.no_progress)
            rows = acc.rows(targets)
        else:
            rows = A.sweep_from_hist(build.histograms(metrics), metrics, thresholds, args.min_keep, W, targets)
        rec, why = A.recommend(rows, targets)
        if args.csv:
            _write_csv(args.csv, rows)
        if args.plot:
            from motion_data.inspect.plots import plot_tune

            plot_tune(rows, targets, rec, args.plot,
                      title=f"{args.build}: min_keep {args.min_keep} ({'exact' if args.exact else 'histograms'})")
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(str(e)) from None  # one line from the dispatcher (exit 2)
    print(f"{args.build}: {build.n_clips} clips, labels by the {build.label_rule} rule, "
          f"{'exact pass' if args.exact else 'from histograms'}; "
          f"targets: {targets}")
    print_sweep(rows, rec, why)
    if args.csv:
        print(f"wrote {args.csv}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
