"""Label statistics of a build before and after a static filter.

Prints four dataset figures for every point kept ("before") and under the filter ("after"):
dynamic_point_ratio (share of points the filter keeps), center_prop (share of kept labels in
the centre class, i.e. no motion), perplexity_ratio (exp(entropy of the labels) / W*W) and the
W*W class counts. The filter default, p95@0.04 with min_keep 16, is the static filter of the
original staged plan this project implements.

The figures come from the histograms in BUILD/stats.zarr (no pass over the shards; exact at
thresholds that are multiples of the histogram bin width, 0.0025). --exact recomputes them
from the per-clip scores and the shards' labels instead. --json writes {"filter", "source",
"before", "after"}; --plot writes a PNG with the label heatmap on the W x W window and the
per-point speed histogram, before and after.
"""
from __future__ import annotations

from motion_data.common.errors import UserError

import json

import numpy as np

from motion_data.common.atomic import atomic_write_json
from motion_data.inspect import analysis as A
from motion_data.build.folder import BuildDir
from motion_data.build import stats as S
from motion_data.common import static_filter as SF
from motion_data.common.cli import DEFAULT_FILTER_SPEC
from motion_data.common.static_filter import DEFAULT_FILTER


def add_arguments(p):
    p.add_argument("build", metavar="BUILD", help="build folder written by build-shards (holds stats.zarr)")
    p.add_argument("--filter", default=DEFAULT_FILTER_SPEC,
                   help="static filter METRIC@THRESHOLD, METRIC one of mean|p95|max: a point is kept when that "
                        "statistic of its per-step speed over the clip reaches THRESHOLD; speed is in units of "
                        "half the label window, (W-1)/2 reference pixels (default: %(default)s)")
    p.add_argument("--min-keep", type=int, default=DEFAULT_FILTER.min_keep,
                   help="points kept per clip when fewer pass the threshold (default: %(default)s; above "
                        f"{S.HIST_RANK_MAX} needs --exact)")
    p.add_argument("--json", metavar="F", help="write the figures as JSON to F ('-' = stdout instead of the table)")
    p.add_argument("--plot", metavar="P", help="write the before/after PNG (label heatmap, speed histogram) to P")
    p.add_argument("--exact", action="store_true",
                   help="recompute from per-clip scores and the shards' labels (one pass over the shards)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar of --exact")


def run(args) -> int:
    try:
        flt = SF.StaticFilter.parse(args.filter, min_keep=args.min_keep)
        if not args.exact and flt.min_keep > S.HIST_RANK_MAX:
            raise ValueError(f"--min-keep {flt.min_keep} exceeds the {S.HIST_RANK_MAX} ranks stored in the "
                             f"histograms; use --exact")
        build = BuildDir(args.build)
        W = build.W
        (points, topk), = build.histograms([flt.metric]).values()
        if args.exact:
            acc = A.exact_from_build(args.build, [flt.metric], [0.0, flt.threshold], flt.min_keep,
                                     progress=not args.no_progress)
            c = acc.counts(flt.metric)
            total = acc.total_points
            before = A.figures(c[0, :-1], total, total, W)  # threshold 0 keeps every point
            result = {"before": before, "after": A.figures(c[1, :-1], int(c[1, -1]), total, W)}
        else:
            result = A.before_after(points, topk, flt.threshold, flt.min_keep, W)
        result = {"filter": str(flt), "source": "exact" if args.exact else "histograms",
                  "label_rule": build.label_rule, **result}
        if args.plot:
            from motion_data.inspect.plots import plot_analysis

            k = min(flt.min_keep, S.HIST_RANK_MAX)
            sb, sa = A.score_hist_before_after(points, topk, flt.threshold, k)
            plot_analysis(result, sb, sa, flt.metric, flt.threshold, W, args.plot,
                          title=f"{args.build}: {flt} ({build.n_clips} clips)")
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(str(e)) from None  # one line from the dispatcher (exit 2)
    if args.json:
        if args.json == "-":
            print(json.dumps(result))
        else:
            atomic_write_json(args.json, result)
    if args.json != "-":
        print(f"{args.build}: {build.n_clips} clips, filter {flt} ({result['source']}), "
              f"labels by the {build.label_rule} rule")
        print(f"{'':8s} {'dynamic_point_ratio':>20s} {'center_prop':>12s} {'perplexity_ratio':>17s}")
        for key in ("before", "after"):
            f = result[key]
            print(f"{key:8s} {f['dynamic_point_ratio']:20.4f} {f['center_prop']:12.4f} {f['perplexity_ratio']:17.4f}")
        for key in ("before", "after"):
            # the counts as a W x W picture of the window (row = dy, col = dx) in percent;
            # the exact counts are in --json
            cc = np.asarray(result[key]["class_counts"], np.float64).reshape(W, W)
            share = 100.0 * cc / max(cc.sum(), 1.0)
            print(f"class_counts {key} (% of {int(cc.sum())} labels; row = dy, col = dx):")
            for row in share:
                print("  " + " ".join(f"{x:5.1f}" if x >= 0.05 else "    ." for x in row))
        if args.json:
            print(f"wrote {args.json}")
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
