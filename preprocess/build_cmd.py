"""Build a dataset from track files: OUT/stats.zarr (per-point statistics and score
histograms), OUT/shards/shard-NNNNNN.tar (webdataset samples), OUT/manifest.parquet (one
row per clip) and OUT/build.json (command, config, counts, skipped inputs, timings).

Re-running the same command after an interruption resumes where it stopped; re-running it
on a finished build does nothing. Another command on an existing OUT is an error unless
--overwrite is given, which discards the build there (finished or not) and starts afresh;
files in OUT that a build does not write are never removed.

Array jobs (Slurm and the like; every node sees OUT): --plan-only once, then --task i/n on
each node, in any order (each reads the plan), then --finalize once. The result equals the
one-process build byte for byte.
"""
from __future__ import annotations

import argparse

from pathlib import Path

from motion_data.build import remote as R
from motion_data.build.build_shards import build
from motion_data.build.setup import DEFAULT_MAXCOUNT, Options, parse_i_of_n
from motion_data.common.storage import is_url, location
from motion_data.common.errors import SettingError, UserError
from motion_data.sources.importers import FORMATS
from motion_data.common.labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W, LABEL_RULES
from motion_data.common.cli import DEFAULT_FILTER_SPEC
from motion_data.common.static_filter import DEFAULT_FILTER, StaticFilter

from .summary import format_summary


def _image_size(s: str):
    try:
        h, w = (int(x) for x in s.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 480,640), got {s!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {s!r}")
    return (h, w)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                   help="track files or folders (searched recursively for .npz .npy .pt .h5 .hdf5); URLs "
                        "(s3://, gs://, https://) are copied to --stage first; required except with --task and "
                        "--finalize, which read the plan")
    p.add_argument("--out", required=True, help="output build folder, or a URL (s3://bucket/build; built in --stage, "
                                                "then published one object per file, build.json last)")
    p.add_argument("--stage", default=None, metavar="DIR",
                   help="local staging folder for remote --input/--out (needs their size on disk; default: the "
                        "system's temporary folder)")
    p.add_argument("--format", default="auto", choices=("auto",) + tuple(FORMATS),
                   help="input format (default: auto-detect per file)")
    p.add_argument("--window", type=int, default=16, help="frames per clip (default %(default)s)")
    p.add_argument("--stride", type=int, default=8, help="frames between clip starts (default 8)")
    p.add_argument("--ref-size", type=int, default=DEFAULT_REF_SIZE,
                   help="positions are stored in pixels of a REF x REF frame (default %(default)s)")
    p.add_argument("--window-size", type=int, default=DEFAULT_W, dest="W",
                   help="label window W (odd; default %(default)s): labels are W*W classes")
    p.add_argument("--workers", type=int, default=1,
                   help="processes loading input files in parallel (output does not depend on it)")
    p.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT,
                   help="clips per shard (the last shard may hold fewer; default %(default)s)")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="build only every N-th input starting at I (0-based) of the sorted input list; "
                        "join the parts with the merge command")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad input file: stop with an error (fail, default) or skip it and report it (skip)")
    p.add_argument("--image-size", type=_image_size, default=None, metavar="H,W",
                   help="frame height and width in pixels, e.g. 480,640, for files that do not store one "
                        "(.npy, bare .pt, ATM without video)")
    p.add_argument("--views", nargs="+", default=None, help="HDF5 views to read (default: all)")
    p.add_argument("--filter", default=DEFAULT_FILTER_SPEC, metavar="METRIC@THR",
                   help="build filter for the manifest's dynamic_ratio/center_share (default %(default)s); "
                        "the stored statistics do not depend on it")
    p.add_argument("--min-keep", type=int, default=DEFAULT_FILTER.min_keep,
                   help="points kept per clip at least, by score, under the build filter (default %(default)s)")
    p.add_argument("--label-rule", choices=LABEL_RULES, default=DEFAULT_LABEL_RULE,
                   help="how a step becomes a class (recorded in stats.zarr and build.json): amplify (default, "
                        "AMPLIFY's rule) = round(clip(p, 0, REF-1)) at both frames, then the difference; "
                        "velocity = round(p[t+1] - p[t]) (this project's earlier rule)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the build in OUT (finished or not, e.g. one that failed or was made with other "
                        "arguments) and build afresh; only the build's own files are removed. Without it an "
                        "interrupted build of the same command resumes")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this machine's process pool (default); ray: plan, shard tasks and finalize as Ray "
                        "tasks spread over the cluster's nodes (the [ray] extra; every node must see --input and "
                        "--out). The output is the same bytes either way")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="the Ray cluster to use with --executor ray (default: start a local Ray on this machine)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--plan-only", action="store_true",
                       help="array builds, step 1: count every input's clips (in --workers processes) and write "
                            "OUT/.work/plan.json, which fixes the clips of every shard")
    steps.add_argument("--task", default=None, metavar="I/N",
                       help="array builds, step 2: write the I-th of N contiguous ranges of the planned shards "
                            "(0-based; any order, on any node; shards already written are kept)")
    steps.add_argument("--finalize", action="store_true",
                       help="array builds, step 3: once every task is done, write stats.zarr, the manifest and "
                            "build.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar and the lines naming skipped inputs as they happen (the summary at the end lists them)")


def command_line(args) -> list[str]:
    """The command with every option spelled out (defaults included), for build.json."""
    cmd = ["python", "-m", "preprocess", "build-shards", "--input", *map(str, args.input or ()), "--out", str(args.out),
           "--format", args.format, "--window", str(args.window), "--stride", str(args.stride),
           "--ref-size", str(args.ref_size), "--window-size", str(args.W), "--workers", str(args.workers),
           "--maxcount", str(args.maxcount), "--on-error", args.on_error, "--filter", args.filter,
           "--min-keep", str(args.min_keep), "--label-rule", args.label_rule]
    if args.part:
        cmd += ["--part", args.part]
    if args.image_size:
        cmd += ["--image-size", f"{args.image_size[0]},{args.image_size[1]}"]
    if args.views:
        cmd += ["--views", *args.views]
    if args.executor != "local":
        cmd += ["--executor", args.executor]
    if args.no_progress:
        cmd.append("--no-progress")
    # --overwrite is not recorded: re-running the recorded command must resume, not start afresh
    return cmd


def _options(args) -> Options:
    try:
        flt = StaticFilter.parse(args.filter, min_keep=args.min_keep)
    except ValueError as e:
        raise SettingError(str(e)) from None
    return Options(fmt=args.format, window=args.window, stride=args.stride, ref_size=args.ref_size, W=args.W,
                   maxcount=args.maxcount, part=args.part, on_error=args.on_error, image_size=args.image_size,
                   views=args.views, build_filter=flt, label_rule=args.label_rule)


def _array_step(args) -> int:
    from motion_data.build import plan as P

    if is_url(args.out) or any(is_url(i) for i in args.input or ()):
        raise SettingError("--plan-only, --task and --finalize need --out and --input on a folder every node sees "
                           "(a shared file system); for object storage use --executor ray with a shared --stage")
    if args.plan_only:
        if not args.input:
            raise SettingError("--plan-only needs --input")
        plan = P.make_plan(args.input, args.out, _options(args), args.workers, args.overwrite,
                           command=command_line(args))
        if "done" in plan:
            raise SettingError(f"{args.out} holds a finished build of these inputs and arguments: nothing to plan")
        print(f"{args.out}: planned {sum(i['clips'] for i in plan['inputs'])} clips in {len(plan['shards'])} shards "
              f"from {len(plan['inputs'])} inputs; next: --task i/n, then --finalize")
    elif args.task:
        r = P.run_task(args.out, *parse_i_of_n(args.task, "--task"))
        print(f"{args.out}: task {r['task']}: {r['shards_written']} shards written, {r['shards_already_done']} "
              f"already there")
    else:
        print(format_summary(P.finalize_plan(args.out)))
    return 0


def _execute(args, inputs, out) -> dict:
    """The build of ``inputs`` into the folder ``out`` by the chosen executor."""
    if args.executor == "ray":
        from motion_data.build.ray_exec import ray_build

        return ray_build(inputs, out, _options(args), address=args.ray_address, overwrite=args.overwrite,
                         progress=not args.no_progress, command=command_line(args))
    return build(inputs, out, _options(args), workers=args.workers, progress=not args.no_progress,
                 command=command_line(args), overwrite=args.overwrite)


def run(args) -> int:
    if args.plan_only or args.task or args.finalize:
        return _array_step(args)
    if not args.input:
        raise SettingError("build-shards needs --input (track files or folders)")
    remote_out = is_url(args.out)
    inputs, out = args.input, args.out
    if remote_out or any(is_url(i) for i in inputs):  # stage, build, publish (build.remote)
        if args.executor == "ray" and not args.stage:
            raise SettingError("--executor ray with URLs needs --stage DIR on a folder every node of the cluster sees: "
                               "the inputs are copied there and the build made there, then published")
        stage = R.stage_root(args.out, args.input, args.stage)
        inputs = R.fetch_inputs(args.input, stage / "inputs", progress=not args.no_progress)
        out = stage / "build" if remote_out else args.out
    try:
        summary = _execute(args, inputs, out)
    except UserError:
        raise  # the dispatcher prints it as one line (exit 2)
    except ValueError as e:  # a bad option value (e.g. --filter)
        raise SettingError(str(e)) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"re-run the same command to resume the build in {args.out}") from None
    if remote_out:
        if R.check_out(location(args.out), Path(out), args.overwrite):
            summary = dict(summary, status="up-to-date")
        else:
            R.publish(Path(out), location(args.out), progress=not args.no_progress)
        summary = dict(summary, out=args.out)
    print(format_summary(summary))
    return 0
