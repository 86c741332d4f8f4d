"""What a run keeps: where it stands (``Progress``), its checkpoints and its run files.

A checkpoint holds every rank's RNG state, epoch sums and codes seen, so a resume with the
same world size continues bit-exactly on CPU (docs/DESIGN.md, Trainer).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from motion_data.common.atomic import atomic_write_json, atomic_write_text

from tokenizer_train.common import distributed as D
from tokenizer_train.common.config import to_dict
from tokenizer_train.evaluate.code_info import CODE_INFO_SEED, M_OTHERS
from tokenizer_train.evaluate.metrics import Sums
from tokenizer_train.model import checkpoint as ckpt
from tokenizer_train.train.class_weights import class_weights_image, save_class_weights


@dataclass
class Progress:
    """Where a run stands (restored on resume): optimizer steps, epoch, batches of the epoch
    done, best score, and this epoch's sums and codes seen (``seen`` on the device)."""
    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    best: float = math.inf
    val_due: dict | None = None  # {"epoch", "scalars"}: a validation a stop signal interrupted
    sums: Sums = field(default_factory=Sums)
    seen: torch.Tensor | None = None
    seen_g: np.ndarray | None = None

    def new_epoch(self, K: int, device):
        self.sums, self.seen, self.seen_g = Sums(), torch.zeros(K, dtype=torch.bool, device=device), np.zeros(K, bool)


def restore(tr) -> Progress:
    """The progress of the run's newest readable checkpoint, with every part of ``tr`` restored."""
    dist, out_dir = tr.dist, tr.out_dir
    st, used, problems = ckpt.load_latest(out_dir / "last.pt")
    if dist.is_main:
        for msg in problems:
            print(f"warning: {msg}; resuming from {used}", file=sys.stderr, flush=True)
    for part, key in ((tr.model, "model"), (tr.optimizer, "optimizer"), (tr.scheduler, "scheduler"),
                      (tr.scaler, "scaler")):
        part.load_state_dict(st[key])
    tr.regulariser.load_state_dict(st.get("code_usage", {}))
    pg = Progress(step=st["step"], epoch=st["epoch"], batches_done=st["batches_done"], best=st["best_val"],
                  val_due=st.get("val_due"))
    pg.new_epoch(tr.K, tr.device)
    mine = ckpt.rank_state(st, dist, pg.batches_done)
    if pg.batches_done:
        pg.sums = Sums(mine["epoch_sums"])
        pg.seen, pg.seen_g = mine["seen"].to(tr.device), st["seen_global"].numpy()
    tr.train_loader.load_state_dict({**st["loader"], "skipped": mine["skipped"] if mine else 0})
    if mine is not None:
        ckpt.set_rng_state(mine["rng"])
    elif dist.is_main:
        print(f"warning: {used} comes from another world size: fresh per-rank RNG seeds", file=sys.stderr)
    if dist.is_main:
        ckpt.trim_metrics(out_dir / "metrics.jsonl", pg.step)
        ckpt.remove_stale_temps(out_dir)
    return pg


def save(tr, pg: Progress, epoch: int, batches_done: int, best_too: bool = False, val_due: dict | None = None):
    """Checkpoint at (epoch, batches_done) (collective: every rank gives its own state); at an
    epoch boundary the sums and codes seen start afresh."""
    boundary = batches_done == 0
    sums = Sums() if boundary else pg.sums
    seen = np.zeros(tr.K, bool) if boundary else pg.seen.cpu().numpy()
    seen_g = np.zeros(tr.K, bool) if boundary else pg.seen_g
    ranks = D.gather_object({"rng": ckpt.rng_state(), "epoch_sums": sums.floats(), "seen": torch.from_numpy(seen),
                             "skipped": int(tr.train_loader.skipped)})
    if not tr.dist.is_main:
        return
    st = {"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
          "scheduler": tr.scheduler.state_dict(), "scaler": tr.scaler.state_dict(),
          "code_usage": tr.regulariser.state_dict(), "rng": ranks[0]["rng"], "ranks": ranks,
          "world_size": tr.dist.world_size, "step": pg.step, "epoch": epoch, "batches_done": batches_done,
          "best_val": pg.best, "epoch_sums": sums.floats(), "seen": torch.from_numpy(seen.copy()),
          "seen_global": torch.from_numpy(seen_g.copy()),
          "loader": {"epoch": epoch, "batches_done": batches_done, "skipped": tr.train_loader.skipped},
          "val_due": val_due,
          "config": to_dict(tr.cfg),
          "meta": {"W": tr.W, "N": tr.N, "T": tr.build.T, "levels": list(tr.levels)}}
    ckpt.save_last(tr.out_dir / "last.pt", st)
    if best_too:
        ckpt.save(tr.out_dir / "best.pt", st)


def write_run_files(tr, logger, step: int = 0):
    """config.yaml, run.json and the class weights (rank 0); the config is logged as text."""
    if not tr.dist.is_main:
        return
    W = tr.W
    if tr.criterion.class_weights is not None:
        w = tr.criterion.class_weights.detach().cpu().numpy()
        save_class_weights(tr.out_dir / "class_weights", w, W, meta={"method": tr.tc.class_weighting.method})
        logger.writer.add_image("train/class_weights", class_weights_image(w, W), 0)
    text = yaml.safe_dump(to_dict(tr.cfg), sort_keys=False)
    atomic_write_text(tr.out_dir / "config.yaml", text)
    logger.log_text("config", text, step)  # a resume with --set logs its own
    atomic_write_json(tr.out_dir / "run.json", {
        "data": str(tr.build.root), "world_size": tr.dist.world_size, "W": W, "N": tr.N, "T": tr.build.T,
        "codebook_size": tr.K, "train_batches_per_epoch": len(tr.train_loader),
        "steps_per_epoch": tr.steps_per_epoch, "parameters": sum(p.numel() for p in tr.model.parameters()),
        "code_info": {"others": M_OTHERS, "seed": CODE_INFO_SEED,
                      "rule": "clips sharing no frame (other split groups, or windows of one at least T frames "
                              "apart), in one fixed permutation of the clips sorted by id"}})
