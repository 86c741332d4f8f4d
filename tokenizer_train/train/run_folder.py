"""What a run folder holds, and whether ``train`` may start a run in it.

A folder given to ``train --out`` is either new (absent or empty), or holds a run, which is
continued with --resume or replaced with --overwrite (that run's own files are removed
first, nothing else), or holds something else, which is refused. So a restart never
appends to an old run's metrics.jsonl nor leaves its event files beside the new ones.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from motion_data.common.errors import DataError, some_names

# the files train writes in RUN (docs/DESIGN.md, Trainer); done.json is ablate's mark of a finished
# run, frontier.json the frontier's cache of it
OWN_NAMES = ("config.yaml", "run.json", "metrics.jsonl", "last.pt", "last.prev.pt", "best.pt",
             "class_weights.npy", "class_weights.json", "done.json", "frontier.json")
# plus the temporary names of interrupted atomic writes (motion_data.common.atomic.temp_path, checkpoint.keep_previous)
OWN_GLOBS = ("events.out.tfevents.*", "debug_codes_rank*.jsonl", ".*.pt.*.link",
             *(f".{n}.tmp*" for n in OWN_NAMES))
OLD_EVENTS_DIR = "tensorboard"  # where event files were written before they moved into RUN itself

def own_files(run_dir) -> list[Path]:
    """The files (and the old event folder) of the run in ``run_dir`` that exist."""
    d = Path(run_dir)
    found = {d / n for n in OWN_NAMES if (d / n).exists()}
    for pat in OWN_GLOBS:
        found.update(p for p in d.glob(pat) if p.is_file())
    if (d / OLD_EVENTS_DIR).is_dir():
        found.add(d / OLD_EVENTS_DIR)
    return sorted(found)


def holds_run(run_dir) -> bool:
    return bool(own_files(run_dir))


def remove_run(run_dir) -> list[Path]:
    """Delete the run's own files in ``run_dir`` (never anything else); returns them."""
    gone = own_files(run_dir)
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return gone


def check_fresh(out_dir, overwrite: bool, has_checkpoint: bool) -> bool:
    """Refuse a fresh start in ``out_dir`` unless it is new, or holds a run and ``overwrite``.

    Returns whether that run's files must be removed (``overwrite`` of a run). Reads only:
    under DDP every rank decides alike, and rank 0 alone removes.
    """
    d = Path(out_dir)
    if not d.exists():
        return False
    if not d.is_dir():
        raise DataError(f"{d}: not a folder; choose another --out")
    ours = own_files(d)
    if not ours:
        others = sorted(d.iterdir())
        if others:
            raise DataError(f"{d}: not empty and not a run folder (holds {some_names(p.name for p in others)}); "
                                 f"choose another --out (--overwrite only replaces a run)")
        return False
    if overwrite:
        return True
    if has_checkpoint:
        raise DataError(f"{d}: already holds a run (last.pt); continue it with --resume {d}, "
                             f"or start afresh with --overwrite (removes that run's files)")
    raise DataError(f"{d}: holds a run that stopped before its first checkpoint ({some_names(p.name for p in ours)}); "
                         f"start it again with --resume {d} (its recorded config) or --overwrite")


def adopt_old_events(run_dir) -> list[Path]:
    """Move event files from RUN/tensorboard (the old layout) into RUN, so a resumed run's
    TensorBoard history stays one run named after its folder."""
    d = Path(run_dir)
    old = d / OLD_EVENTS_DIR
    if not old.is_dir():
        return []
    moved = []
    for p in sorted(old.glob("events.out.tfevents.*")):
        p.replace(d / p.name)
        moved.append(d / p.name)
    if not any(old.iterdir()):
        old.rmdir()
    return moved
