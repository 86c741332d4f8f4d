"""Text tables that several commands print (preprocess tune-filter, the tokenizer demo)."""
from __future__ import annotations


def print_sweep(rows, rec: int, why: str) -> None:
    """The sweep table with the recommended row marked, and the recommendation line."""
    print(f"{'metric':6s} {'threshold':>9s} {'min_keep':>8s} {'dynamic_point_ratio':>19s} {'center_prop':>11s} "
          f"{'perplexity_ratio':>16s} {'meets_targets':>13s}")
    for i, r in enumerate(rows):
        mark = "  <- recommended" if i == rec else ""
        print(f"{r.metric:6s} {r.threshold:9.4f} {r.min_keep:8d} {r.dynamic_point_ratio:19.4f} "
              f"{r.center_prop:11.4f} {r.perplexity_ratio:16.4f} {str(r.meets_targets):>13s}{mark}")
    r = rows[rec]
    print(f"recommended: {r.metric}@{r.threshold:g} min_keep {r.min_keep} -- {why}")
