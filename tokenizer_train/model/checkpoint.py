"""Checkpoints: ``last.pt`` (plus ``last.prev.pt``, the one before it) and ``best.pt``.

Written atomically (temporary file in the same folder, fsync, ``os.replace``) so a crash
never leaves a torn checkpoint under a final name. ``save_last`` first gives the current
file the second name ``<stem>.prev.pt`` (a hard link, renamed), so at every instant at
least one complete checkpoint exists; ``load_latest`` falls back to it when the newest one is
unreadable (a truncated copy, a disk that filled up, a file damaged afterwards).

Read with ``torch.load(weights_only=True)``: everything stored is plain tensors, numbers,
strings, lists and dicts (RNG states included), and nothing can run code on loading.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from motion_data.common.atomic import atomic_open

from tokenizer_train.common.config import from_dict
from tokenizer_train.model.model import MotionTokenizer
from motion_data.common.errors import DataError, SettingError, one_line

REQUIRED_KEYS = ("model", "optimizer", "step", "epoch")

def rng_state() -> dict:
    """torch (CPU and CUDA), numpy legacy global and python ``random`` states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prev_path(path) -> Path:
    """``RUN/last.pt`` -> ``RUN/last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(d: Path):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    _fsync_dir(path.parent)  # the rename itself survives a power cut
    return path


def keep_previous(path) -> Path | None:
    """Give the current ``path`` (if any) the second name ``prev_path(path)``, by a hard link
    renamed over the old one: there is never a moment without a complete checkpoint under
    one of the two names."""
    path = Path(path)
    if not path.exists():
        return None
    link = path.with_name(f".{path.name}.{os.getpid()}.link")
    if link.exists():
        link.unlink()
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: a copy, still renamed into place
        import shutil
        shutil.copyfile(path, link)
    os.replace(link, prev_path(path))
    return prev_path(path)


def has_last(run_dir) -> bool:
    """Whether ``RUN`` holds a ``last.pt`` or the ``last.prev.pt`` a torn save falls back to."""
    last = Path(run_dir) / "last.pt"
    return last.exists() or prev_path(last).exists()


def save_last(path, state: dict) -> Path:
    """``keep_previous`` then ``save``: what the trainer does for ``last.pt``."""
    keep_previous(path)
    return save(path, state)


def remove_stale_temps(run_dir) -> list[Path]:
    """Remove the temporary files of saves that a kill interrupted (never final names)."""
    gone = []
    for pat in (".*.pt.tmp*", ".*.pt.*.link"):  # atomic.temp_path's and keep_previous's names
        for p in Path(run_dir).glob(pat):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint; FileNotFoundError if absent, DataError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: cannot read checkpoint (empty file)")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a torn or foreign file
        msg = one_line(e).split(". This is an internal")[0][:160]
        raise DataError(f"{path}: cannot read checkpoint (truncated or not a checkpoint: "
                              f"{type(e).__name__}: {msg})") from None
    if not isinstance(st, dict):
        raise DataError(f"{path}: not a checkpoint (holds a {type(st).__name__}, not a dict)")
    return st


def load_latest(path, map_location="cpu", required=REQUIRED_KEYS) -> tuple[dict, Path, list[str]]:
    """The newest readable of ``path`` and ``prev_path(path)``.

    Returns ``(state, the file read, problems)``: ``problems`` holds one line per file that
    was skipped (empty when ``path`` itself was fine). Raises FileNotFoundError when neither
    exists and DataError naming both when neither can be read.
    """
    path = Path(path)
    candidates = [p for p in (path, prev_path(path)) if p.exists()]
    if not candidates:
        raise FileNotFoundError(f"{path}: no checkpoint")
    problems = []
    for p in candidates:
        try:
            st = load(p, map_location)
        except DataError as e:
            problems.append(str(e))
            continue
        missing = [k for k in required if k not in st]
        if missing:
            problems.append(f"{p}: not a training checkpoint (lacks {', '.join(missing)})")
            continue
        return st, p, problems
    raise DataError(" ; ".join(problems))


# ------------------------------------------------------------------ the trainer's state
def rank_state(st: dict, dist, start_batch: int) -> dict | None:
    """This rank's part of a checkpoint (RNG, loss sums, codes seen, skipped samples).

    None when the checkpoint comes from another world size at an epoch boundary (the rank
    keeps its fresh seed; the continuation is then not bit-exact); an error mid-epoch.
    """
    ranks = st.get("ranks") or [{"rng": st["rng"], "epoch_sums": st["epoch_sums"], "seen": st["seen"],
                                 "skipped": st["loader"].get("skipped", 0)}]
    if len(ranks) == dist.world_size:
        return ranks[dist.rank]
    if start_batch:
        raise SettingError(f"the checkpoint was taken mid-epoch by {len(ranks)} processes; resume it with "
                         f"{len(ranks)} (now {dist.world_size})")
    return None


def trim_metrics(path: Path, step: int):
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (those the resumed checkpoint has
    seen); later ones, and a line torn by a kill, are logged again by the resumed run."""
    import json

    from motion_data.common.atomic import atomic_write_text

    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(f"{x}\n" for x in keep))


def load_model(run_dir, which: str = "best", device="cpu"):
    """(model in eval mode, config, checkpoint meta) of a run."""
    st = load(Path(run_dir) / f"{which}.pt", map_location=device)
    cfg = from_dict(st["config"])
    meta = st["meta"]
    model = MotionTokenizer(cfg.model, num_points=meta["N"], window_size=meta["W"])
    model.load_state_dict(st["model"])
    return model.to(device).eval(), cfg, meta
