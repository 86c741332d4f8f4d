"""Join the outputs of several build-shards --part i/n runs (e.g. the tasks of a cluster
array job) into one build folder, equal in content to a single run over all inputs: the
same clips in the same order, the same statistics and histograms. Shards are hard-linked
(copied across file systems) under new consecutive numbers; the parts are left as they are.
"""
from __future__ import annotations

from motion_data.build.merge import merge

from .summary import format_summary


def add_arguments(p) -> None:
    p.add_argument("parts", nargs="+", metavar="OUT_PART", help="finished --part build folders, all i of one i/n")
    p.add_argument("--out", required=True, help="new (or empty) folder for the merged build")


def run(args) -> int:
    summary = merge(args.parts, args.out)  # a DataError is one line from the dispatcher (exit 2)
    print(format_summary(summary))
    return 0
