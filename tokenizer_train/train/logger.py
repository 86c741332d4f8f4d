"""Run logging: TensorBoard event files and ``metrics.jsonl``, both directly in RUN.

The event files sit in RUN itself, so ``tensorboard --logdir`` of the folder above several
runs names each run after its folder. The resolved config is logged as text (``config``)
and, once the run is complete, as hparams with its final metrics (the HPARAMS tab).

Every log event is one JSON object per line, ``{"step": .., "epoch": .., tag: value, ...}``
(``epoch`` is the 0-based epoch index), carrying the same numbers as the TensorBoard
scalars; a code-usage histogram is written as the list of per-code counts. Only rank 0
writes; other ranks get a logger whose methods do nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


class RunLogger:
    def __init__(self, run_dir, enabled: bool = True, purge_step: int | None = None):
        """``purge_step``: on resume, TensorBoard drops events at steps >= it (logged after the
        checkpoint by the killed run; they are logged again), as metrics.jsonl is trimmed; the
        resumed run appends to metrics.jsonl, a new one starts it empty."""
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
            self._jsonl = open(run_dir / "metrics.jsonl", "a" if purge_step is not None else "w", buffering=1)

    def log(self, step: int, epoch: int, scalars: dict, hists: dict | None = None):
        """Scalars ``{tag: number}``; hists ``{tag: per-code counts array}``."""
        if not self.enabled:
            return
        row = {"step": int(step), "epoch": int(epoch)}
        for tag, v in scalars.items():
            if v is None:
                continue
            self.writer.add_scalar(tag, float(v), step)
            row[tag] = _jsonable(v)
        for tag, counts in (hists or {}).items():
            counts = np.asarray(counts, dtype=np.int64)
            if counts.sum() > 0:
                ids = np.repeat(np.arange(counts.size), counts)
                self.writer.add_histogram(tag, ids, step, bins=np.arange(counts.size + 1) - 0.5)
            row[tag] = counts.tolist()
        self._jsonl.write(json.dumps(row) + "\n")

    def log_text(self, tag: str, text: str, step: int = 0):
        """``text`` shown verbatim (indented: a code block in TensorBoard's markdown)."""
        if self.enabled:
            self.writer.add_text(tag, "".join(f"    {line}\n" for line in text.splitlines()), step)

    def log_hparams(self, hparams: dict, metrics: dict):
        """Hyperparameters (flat ``{dotted key: value}``) and the final ``metrics`` in this run's
        own event file (``SummaryWriter.add_hparams`` would make a sub-run folder)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in hparams.items()}
        mt = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and math.isfinite(v)}
        for summary in hparams_summary(hp, mt):  # experiment, session start, session end
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self):
        if self.enabled:
            self.writer.close()
            self._jsonl.close()
