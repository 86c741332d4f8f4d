"""Render scripted LIBERO rollouts offscreen and write their ground-truth point tracks.

Each rollout loads a LIBERO task, puts in one of its stored initial states (chosen at
random), lets the objects settle, and drives the arm with a scripted reach / descend /
grasp / lift / carry / lower / release controller whose speed, gain, heights, pauses,
grasp misses, wrist turns and action noise are drawn per rollout. The agentview camera
(128x128, MuJoCo offscreen, EGL unless MUJOCO_GL says otherwise) records depth and
segmentation; a 20x20 grid placed on the first frame of every window (one starts every
--stride frames, 16 frames long) is attached to the bodies under it, moved with them and
projected back; a point is visible where the depth test passes.

Writes OUT/<suite>_<task>_<episode>.npz (tracks (B,16,400,2) px, visibility (B,16,400),
image_size, start_frame; with --frames also frames (steps,128,128,3) uint8), which
build-shards --input OUT reads. Finished rollouts are skipped, so re-running the same
command after a kill goes on where it stopped; OUT/render.json records the settings, and a
folder rendered with other settings is refused (--overwrite starts it afresh). Deterministic
given --seed.

Needs the simulator extra: pip install torch==2.13.0 -e ".[sim]"

Example: python -m preprocess render-libero --out libero_tracks/ --suites libero_object --tasks 0-4 --episodes-per-task 2
"""
from __future__ import annotations

from motion_data.common.errors import SettingError, UserError

import time

from motion_data.sources.libero.render import DEFAULT_SUITES, RenderConfig, require_sim, suite_size
from motion_data.sources.libero.jobs import claim_folder, parse_tasks, pending, run_jobs


def add_arguments(p):
    d = RenderConfig()
    p.add_argument("--out", required=True, help="output folder for the <suite>_<task>_<episode>.npz track files")
    p.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                   help="comma-separated LIBERO suites, e.g. libero_90,libero_object (default: %(default)s)")
    p.add_argument("--tasks", default="all",
                   help="task indices within each suite: 'all' or a list with ranges, e.g. 0-4,10 (default: %(default)s)")
    p.add_argument("--episodes-per-task", type=int, default=2,
                   help="rollouts per task, each with its own initial state and motion (default: %(default)s)")
    p.add_argument("--stride", type=int, default=d.stride, help="frames between window starts (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="recorded control steps (= frames) per rollout; windows per rollout = "
                        "(steps - 16) // stride + 1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="random seed; a rollout depends only on (seed, suite, task, episode) (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, each rendering one scene at a time (default: %(default)s)")
    p.add_argument("--frames", action="store_true",
                   help="also store the RGB agentview frames in each file (key 'frames'), for pictures")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds rollouts rendered with other settings (OUT/render.json records them): remove "
                        "those rollout files (only <suite>_<task>_<episode>.npz and render.json) and render afresh; "
                        "without it such a folder is refused")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    try:
        require_sim()
        cfg = RenderConfig(stride=args.stride, steps=args.steps, seed=args.seed, frames=args.frames)
        if args.episodes_per_task < 1 or args.workers < 1:
            raise ValueError(f"render-libero: --episodes-per-task and --workers must be >= 1, "
                             f"got {args.episodes_per_task}, {args.workers}")
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        # every argument is checked before --overwrite removes anything
        tasks = {suite: parse_tasks(args.tasks, suite_size(suite), suite) for suite in suites}
        claim_folder(args.out, cfg, args.overwrite)
        jobs = [j for suite in suites for j in pending(args.out, suite, tasks[suite], args.episodes_per_task)]
    except ValueError as e:  # SettingError included
        raise UserError(str(e)) from None  # one line from the dispatcher (exit 2)
    from tqdm import tqdm

    total = sum(len(e) for _, _, e in jobs)
    with tqdm(total=total, unit="rollout", desc="render-libero", disable=args.no_progress) as bar:
        def done(s):
            bar.update(1)
            bar.write(f"{s['name']}: {s['windows']} windows, {s['visible']:.1%} visible, init state {s['init_state']}, "
                      f"{'missed grasp' if s['grasp_fails'] else 'grasp'}, last phase {s['phase_reached']}, "
                      f"{s['seconds']:.1f} s")
        t0 = time.perf_counter()
        try:
            summaries = run_jobs(jobs, cfg, args.out, args.workers, on_done=done)
        except SettingError as e:
            raise UserError(str(e)) from None  # one line from the dispatcher (exit 2)
        wall = time.perf_counter() - t0
    if summaries:
        n = len(summaries)
        print(f"rendered {n} rollouts into {args.out}: {sum(s['windows'] for s in summaries)} windows, "
              f"{sum(s['visible'] for s in summaries) / n:.1%} visible on average, "
              f"{sum(s['seconds'] for s in summaries) / n:.1f} s per rollout "
              f"({wall / n:.1f} s wall per rollout with scene loading, {args.workers} worker(s))")
    else:
        print(f"nothing to render: all requested rollouts are in {args.out}")
    return 0
