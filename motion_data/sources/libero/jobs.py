"""Which LIBERO rollouts to render, and rendering them in worker processes (render-libero).

A rollout is (suite, task, episode) and lands in ``OUT/<suite>_<task>_<episode>.npz``.
Rollouts whose file exists are finished (files are written atomically, so an existing
file is whole) and are skipped, which makes a killed render go on where it stopped. Jobs
are grouped by task so that a worker builds each scene once; each worker process holds
one scene at a time (EGL: one GL context per process).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import re
from pathlib import Path

from motion_data.common.atomic import atomic_write_json, remove_stale
from motion_data.common.errors import UserError
from motion_data.common.parent_death import exit_with_parent

SETTINGS_FILE = "render.json"
# rollout_name's <suite>_<task>_<episode>.npz; suite names hold underscores (libero_goal_swap)
_ROLLOUT = re.compile(r"libero_\w+_\d+_\d+\.npz", re.IGNORECASE)


def claim_folder(out, cfg, overwrite: bool = False) -> None:
    """Record ``cfg`` in ``OUT/render.json``, so that rollouts of other settings are never mixed.

    A folder whose rollouts were rendered with other settings (or by an older version, with no
    render.json) is refused; ``overwrite`` removes those rollouts (only ``<suite>_<task>_<ep>.npz``
    and render.json, never other files) and starts afresh.
    """
    out = Path(out)
    want = {"format": 1, **dataclasses.asdict(cfg)}
    path = out / SETTINGS_FILE
    try:
        have = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        have = {"unreadable": True}
    rollouts = sorted(p for p in out.glob("*.npz") if _ROLLOUT.fullmatch(p.name)) if out.is_dir() else []
    if have == want:
        return
    if have is not None or rollouts:
        if not overwrite:
            what = (", ".join(f"{k} {have.get(k)} -> {v}" for k, v in want.items() if have.get(k) != v)
                    if have is not None else f"{len(rollouts)} rollouts and no {SETTINGS_FILE} (an older version)")
            raise UserError(f"{out}: holds rollouts rendered with other settings ({what}); pass --overwrite to "
                            f"remove them and render afresh, or choose another --out")
        for p in rollouts:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, want)


def parse_tasks(spec: str, n_tasks: int, suite: str = "") -> list[int]:
    """``all`` or a comma list of task indices and ranges (``0-4,10``) -> sorted task indices."""
    if spec.strip().lower() == "all":
        return list(range(n_tasks))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"render-libero: --tasks {spec!r}: {part!r} is not a task index or range (e.g. 0-4,10)") from None
        if not 0 <= lo <= hi < n_tasks:
            raise ValueError(f"render-libero: --tasks {spec!r}: {suite or 'the suite'} has tasks 0-{n_tasks - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def pending(out, suite: str, tasks, episodes: int) -> list[tuple[str, int, list[int]]]:
    """``(suite, task, episodes still to render)`` per task with work left; removes stale temp files."""
    from motion_data.sources.libero.render import rollout_name

    out = Path(out)
    jobs = []
    for task in tasks:
        todo = []
        for ep in range(episodes):
            path = out / rollout_name(suite, task, ep)
            remove_stale(path)
            if not path.is_file():
                todo.append(ep)
        if todo:
            jobs.append((suite, task, todo))
    return jobs


def render_task(suite: str, task: int, episodes, cfg, out, on_done=None) -> list[dict]:
    """Render and write the given episodes of one task in this process; returns their summaries."""
    from motion_data.sources.libero.render import Scene, render_rollout
    from motion_data.sources.video import write_track_file

    summaries = []
    with Scene(suite, task, cfg.size) as scene:
        for ep in episodes:
            data, summary = render_rollout(scene, suite, task, ep, cfg)
            write_track_file(Path(out) / summary["name"], data)
            summaries.append(summary)
            if on_done is not None:
                on_done(summary)
    return summaries


def _worker(args):
    return render_task(*args)


def run_jobs(jobs, cfg, out, workers: int = 1, on_done=None) -> list[dict]:
    """Render every job; ``on_done(summary)`` is called per rollout (per task with workers > 1)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        return [s for suite, task, eps in jobs for s in render_task(suite, task, eps, cfg, out, on_done)]
    summaries = []
    # spawn: a fresh interpreter per worker, no GL state inherited; one task (one scene) per process
    # workers die with this process (exit_with_parent): a killed render leaves none behind
    with mp.get_context("spawn").Pool(workers, initializer=exit_with_parent, initargs=(os.getpid(),),
                                      maxtasksperchild=1) as pool:
        for done in pool.imap_unordered(_worker, [(s, t, e, cfg, out) for s, t, e in jobs]):
            summaries.extend(done)
            for s in done:
                if on_done is not None:
                    on_done(s)
    return summaries
