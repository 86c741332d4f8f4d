"""Train a motion tokenizer on a build folder (also under torchrun).

  python -m tokenizer_train train --config configs/base.yaml --data BUILD --out RUN
  torchrun --nproc-per-node 2 -m tokenizer_train train --config ... --data BUILD --out RUN
  python -m tokenizer_train train --resume RUN          # continue exactly where RUN stopped

RUN receives config.yaml (the resolved config), run.json, metrics.jsonl (one JSON object per
log event), TensorBoard event files (tensorboard --logdir RUN, or the folder above several
runs to compare them: the config is logged as text, and as hparams with the run's final
metrics), last.pt (and last.prev.pt, the one before it) and best.pt (lowest val/loss_epoch).

RUN must be new or empty. A folder that holds a run is continued with --resume RUN or
replaced with --overwrite (that run's files are removed first, nothing else); a folder
that holds other files is refused.

Interruptions: Ctrl-C or SIGTERM finishes the current step, saves last.pt and prints the
command that resumes (exit 130 or 143; under torchrun every rank stops at the same step); a
second Ctrl-C quits at once. A run killed at any moment resumes with --resume RUN from its
newest readable checkpoint (last.pt, else last.prev.pt); every rank's RNG state, loss sums
and code counts are in it, so on CPU with the same world size the continuation is bit-exact.
What the killed run logged after that checkpoint (metrics.jsonl rows, TensorBoard events)
is dropped on resume and logged again. A run killed before its first checkpoint starts
again from step 0 with --resume RUN (the config and build it recorded), its old logs removed.
Override any config key with --set KEY=VALUE ...; an unknown key is an error.
BUILD may be a URL (s3://, gs://, https://; the cloud extra): shards are read by byte range.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from motion_data.common.atomic import atomic_write_json, atomic_write_text
from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError, UserError, one_line
from motion_data.common.storage import location

from tokenizer_train.model import checkpoint as ckpt
from tokenizer_train.common import distributed as D
from tokenizer_train.evaluate import metrics as M
from tokenizer_train.train import heap, prior, run_folder as RF
from tokenizer_train.train.class_weights import class_weights_image, save_class_weights, training_class_counts
from tokenizer_train.evaluate.code_info import CODE_INFO_SEED, M_OTHERS
from tokenizer_train.evaluate.code_usage import CodeUsageRegulariser, entropy_weight
from tokenizer_train.common.config import Config, add_set_argument, flatten, load_config, to_dict
from tokenizer_train.train.setup import autocast_for, make_loaders, seed_everything
from tokenizer_train.train.logger import RunLogger
from tokenizer_train.train.losses import Criterion
from tokenizer_train.evaluate.metrics import Sums
from tokenizer_train.model.model import MotionTokenizer
from tokenizer_train.model.model_inputs import model_kwargs, take, with_index
from tokenizer_train.train.schedule import build_scheduler, clip_gradients
from tokenizer_train.common.stop import StopSignals, Stopped
from tokenizer_train.evaluate.validate import clip_places, evaluate, to_device, train_code_info


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--config", help="YAML config (default: built-in defaults; with --resume: RUN/config.yaml)")
    p.add_argument("--data", help="build folder written by python -m preprocess build-shards "
                                  "(with --resume: the one recorded in RUN/run.json)")
    p.add_argument("--out", help="run folder to create: absent or empty, or a run with --overwrite (with --resume: RUN)")
    add_set_argument(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt: model, optimizer, scheduler, "
                   "grad scaler, sampler position, RNG states, step and epoch (a run stopped before its first "
                   "checkpoint starts again from step 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in --out although it holds a run: that run's files (checkpoints, logs, "
                        "config.yaml, run.json, event files) are removed first; other files are kept")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug-codes", action="store_true",
                   help="each rank also appends its code ids of every code-log step to RUN/debug_codes_rank<r>.jsonl "
                        "(to check the *_global statistics)")


def run(args) -> int:
    cfg, data_dir, out_dir, resume, overwrite = _resolve(args)  # a UserError: one line from the dispatcher
    dist = D.init(cfg.training.device)
    try:
        train(cfg, data_dir, out_dir, resume=resume, dist=dist, debug_codes=args.debug_codes, overwrite=overwrite,
              progress=not args.no_progress)
    # the user's errors (UserError) are printed by the dispatcher as one line; anything else
    # raised while training is a bug and keeps its traceback
    except Stopped as e:  # checkpoint saved: one line that says how to continue
        if dist.is_main:
            print(f"python -m tokenizer_train train: {e.message()}", file=sys.stderr, flush=True)
        D.barrier()  # no rank exits (torchrun then ends the others) before rank 0 has said it
        return e.exit_code
    finally:
        D.cleanup()
    return 0


def _resolve(args):
    """(config, data dir, run dir, resume?, overwrite?) from the command line and, on resume,
    the run; a run stopped before its first checkpoint is started again (overwrite)."""
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise UserError("--out must be omitted or equal to --resume RUN")
        if args.overwrite:
            raise UserError("--overwrite starts afresh and --resume continues: give one of them")
        started = ckpt.has_last(run_dir)
        if not started and not (run_dir / "run.json").exists():
            raise UserError(f"{run_dir}: nothing to resume (no last.pt, no run.json); start a run "
                                    f"there with --data BUILD --out {run_dir} (add --overwrite if it holds one)")
        try:
            recorded = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{run_dir / 'run.json'}: unreadable ({one_line(e)})") from None
        cfg = load_config(args.config or run_dir / "config.yaml", args.set)
        if not started and int(os.environ.get("RANK", "0")) == 0:
            print(f"{run_dir}: stopped before its first checkpoint; starting it again from step 0", file=sys.stderr)
        return cfg, location(args.data or recorded["data"]), run_dir, started, not started
    if not args.data or not args.out:
        raise UserError("--data and --out are required (or --resume RUN)")
    return load_config(args.config, args.set), location(args.data), Path(args.out), False, args.overwrite


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


class Trainer:
    """The objects of one run (model, optimisation, data, logging) and the steps of its loop."""

    def __init__(self, cfg: Config, build: BuildDir, out_dir: Path, dist: D.Dist, debug_codes: bool, progress: bool,
                 stop: StopSignals):
        tc, self.device = cfg.training, dist.device
        self.cfg, self.tc, self.build, self.out_dir, self.dist = cfg, tc, build, out_dir, dist
        self.debug_codes, self.progress, self.stop = debug_codes, progress, stop
        self.W, self.N, self.S = build.W, build.N, build.S
        self.train_loader, self.val_loader = make_loaders(build.root, cfg, dist.rank, dist.world_size, dist.device)
        self.model = model = MotionTokenizer(cfg.model, num_points=self.N, window_size=self.W).to(self.device)
        self.levels, self.K = cfg.model.fsq_levels, model.codebook_size
        self.L = self.S * model.tokens_per_step  # tokens per clip (model.groups per step)
        seed_everything(tc.seed + 1000 * dist.rank)  # dropout and noise differ between ranks
        self.net = D.wrap_ddp(model, self.device) if dist.enabled else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
        self.accum = tc.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.accum)
        self.scheduler = build_scheduler(self.optimizer, tc.lr_schedule, self.steps_per_epoch * tc.epochs,
                                         tc.learning_rate)
        autocast_for(tc.mixed_precision, self.device)  # fail now on fp16 without CUDA
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.mixed_precision == "fp16")
        counts = (training_class_counts(build, cfg.data, progress=dist.is_main and progress)  # may read shards
                  if tc.class_weighting.method != "none" else None)
        self.criterion = prior.wrap(Criterion(tc, counts, self.W), tc)  # training.logit_adjustment (off: unchanged)
        self.regulariser = CodeUsageRegulariser(tc, self.levels, distributed=dist.enabled)  # checkpointed
        self.places = clip_places(build)  # code information pairs clips that share no frame

    def autocast(self):
        return autocast_for(self.tc.mixed_precision, self.device)

    # ------------------------------------------------------------------ state
    def restore(self) -> Progress:
        """The progress of the run's newest readable checkpoint, with every part restored."""
        dist, out_dir = self.dist, self.out_dir
        st, used, problems = ckpt.load_latest(out_dir / "last.pt")
        if dist.is_main:
            for msg in problems:
                print(f"warning: {msg}; resuming from {used}", file=sys.stderr, flush=True)
        for part, key in ((self.model, "model"), (self.optimizer, "optimizer"), (self.scheduler, "scheduler"),
                          (self.scaler, "scaler")):
            part.load_state_dict(st[key])
        self.regulariser.load_state_dict(st.get("code_usage", {}))
        pg = Progress(step=st["step"], epoch=st["epoch"], batches_done=st["batches_done"], best=st["best_val"],
                      val_due=st.get("val_due"))
        pg.new_epoch(self.K, self.device)
        mine = ckpt.rank_state(st, dist, pg.batches_done)
        if pg.batches_done:
            pg.sums = Sums(mine["epoch_sums"])
            pg.seen, pg.seen_g = mine["seen"].to(self.device), st["seen_global"].numpy()
        self.train_loader.load_state_dict({**st["loader"], "skipped": mine["skipped"] if mine else 0})
        if mine is not None:
            ckpt.set_rng_state(mine["rng"])
        elif dist.is_main:
            print(f"warning: {used} comes from another world size: fresh per-rank RNG seeds", file=sys.stderr)
        if dist.is_main:
            ckpt.trim_metrics(out_dir / "metrics.jsonl", pg.step)
            ckpt.remove_stale_temps(out_dir)
        return pg

    def save(self, pg: Progress, epoch: int, batches_done: int, best_too: bool = False, val_due: dict | None = None):
        """Checkpoint at (epoch, batches_done) (collective: every rank gives its own state);
        at an epoch boundary the sums and codes seen start afresh."""
        boundary = batches_done == 0
        sums = Sums() if boundary else pg.sums
        seen = np.zeros(self.K, bool) if boundary else pg.seen.cpu().numpy()
        seen_g = np.zeros(self.K, bool) if boundary else pg.seen_g
        ranks = D.gather_object({"rng": ckpt.rng_state(), "epoch_sums": sums.floats(), "seen": torch.from_numpy(seen),
                                 "skipped": int(self.train_loader.skipped)})
        if self.dist.is_main:
            st = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                  "code_usage": self.regulariser.state_dict(), "rng": ranks[0]["rng"], "ranks": ranks,
                  "world_size": self.dist.world_size, "step": pg.step, "epoch": epoch, "batches_done": batches_done,
                  "best_val": pg.best, "epoch_sums": sums.floats(), "seen": torch.from_numpy(seen.copy()),
                  "seen_global": torch.from_numpy(seen_g.copy()),
                  "loader": {"epoch": epoch, "batches_done": batches_done, "skipped": self.train_loader.skipped},
                  "val_due": val_due,
                  "config": to_dict(self.cfg),
                  "meta": {"W": self.W, "N": self.N, "T": self.build.T, "levels": list(self.levels)}}
            ckpt.save_last(self.out_dir / "last.pt", st)
            if best_too:
                ckpt.save(self.out_dir / "best.pt", st)

    def write_run_files(self, logger: RunLogger, step: int = 0):
        if not self.dist.is_main:
            return
        tc, W = self.tc, self.W
        if self.criterion.class_weights is not None:
            w = self.criterion.class_weights.detach().cpu().numpy()
            save_class_weights(self.out_dir / "class_weights", w, W, meta={"method": tc.class_weighting.method})
            logger.writer.add_image("train/class_weights", class_weights_image(w, W), 0)
        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        atomic_write_text(self.out_dir / "config.yaml", text)
        logger.log_text("config", text, step)  # a resume with --set logs its own
        atomic_write_json(self.out_dir / "run.json", {
            "data": str(self.build.root), "world_size": self.dist.world_size, "W": W, "N": self.N, "T": self.build.T,
            "codebook_size": self.K, "train_batches_per_epoch": len(self.train_loader),
            "steps_per_epoch": self.steps_per_epoch, "parameters": sum(p.numel() for p in self.model.parameters()),
            "code_info": {"others": M_OTHERS, "seed": CODE_INFO_SEED,
                          "rule": "clips sharing no frame (other split groups, or windows of one at least T frames "
                                  "apart), in one fixed permutation of the clips sorted by id"}})

    # ------------------------------------------------------------------ the loop
    def forward_backward(self, batch, epoch_float: float, sync: bool):
        """One micro-batch: forward, loss, backward. Returns (out, loss, info, total, lam, soft)."""
        tc = self.tc
        ctx = contextlib.nullcontext() if (sync or not self.dist.enabled) else self.net.no_sync()
        soft = None
        sel = batch.get("decode_index")  # None: every entry (training.decode_points: all)
        with ctx:
            with self.autocast():
                if sel is None:
                    out = self.net(batch["velocities"], **model_kwargs(batch))
                    loss, info = self.criterion(out["logits"], batch["labels"], batch["mask"])
                    out["pred"] = out["logits"].detach().argmax(-1).reshape(-1)
                else:  # the loss mask's and the evaluation mask's entries only, the loss in chunks
                    out = self.net(batch["velocities"], **model_kwargs(batch), index=sel, features=True)
                    loss, info, out["pred"] = self.criterion.fused(out["features"], self.model.out_layer,
                                                                   take(batch["labels"], sel), take(batch["mask"], sel))
                lam = entropy_weight(tc.code_entropy_weight, tc.code_entropy_warmup_epochs, epoch_float)
                total = loss
                if lam > 0:
                    term, soft = self.regulariser(out["z_bounded"])
                    total = loss + lam * term
            self.scaler.scale(total / self.accum).backward()
        return out, loss, info, total, lam, soft

    def optimizer_step(self) -> torch.Tensor:
        """Unscale, clip, step, zero, advance the schedule; the pre-clip gradient norm (on the device)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.tc.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def step_log(self, step_sums: Sums, out, grad_norm, lam, soft, t_wait, elapsed, clips) -> dict:
        """The ``train/*_step`` scalars of a log step (collective; the host reads the sums here)."""
        r = step_sums.reduced(self.device)
        extra = {} if soft is None else {"train/code_entropy_soft_step": float(soft)}
        return {**M.step_scalars(r),
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/code_entropy_weight": lam,
                "train/quant_input_tanh_scale": self.model.shaping.scale_value(),
                "perf/loader_wait_share": t_wait / max(elapsed, 1e-9),
                "perf/clips_per_s": clips * self.dist.world_size / max(elapsed, 1e-9),
                **extra,
                "train/quant_input_std_step": float(out["quant_in"].detach().float().std())}

    def code_log(self, pg: Progress, step_codes: list, batch, out) -> tuple[dict, dict]:
        """The code statistics of a code-log step (collective): this rank's and all ranks'."""
        codes = torch.cat([c.reshape(-1, self.L) for c in step_codes])
        zc = self.model.zero_codes(self.S).cpu().numpy()
        local, seen = codes.cpu().numpy(), pg.seen.cpu().numpy()
        gathered = D.gather_codes(codes).reshape(-1, self.L)
        pg.seen_g = D.all_reduce_any(pg.seen_g | seen, self.device)
        cs, ch = M.code_scalars("train", "step", local, self.levels, zc, seen)
        gs, gh = M.code_scalars("train", "step", gathered, self.levels, zc, pg.seen_g, tag_suffix="_global")
        scalars = cs | gs
        scalars["train/code_info_bits_step"] = train_code_info(self.model, batch, out["quantized"], self.device,
                                                                     self.places)
        if self.debug_codes:  # each rank's own codes: a test recomputes the *_global statistics
            with open(self.out_dir / f"debug_codes_rank{self.dist.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": pg.step, "codes": local.tolist()}) + "\n")
        return scalars, ch | gh

    def train_epoch(self, pg: Progress, epoch: int, logger: RunLogger, last: dict):
        """The optimizer steps of one epoch from ``pg.batches_done``; no host sync on a step
        that logs nothing: sums and codes seen stay on the device."""
        tc, loader = self.tc, self.train_loader
        loader.set_epoch(epoch)  # keeps a resumed mid-epoch position
        if pg.batches_done == 0:
            pg.new_epoch(self.K, self.device)
        step_sums, step_codes = Sums(), []
        n_batches = len(loader)
        self.net.train()
        bar = tqdm(total=n_batches, initial=pg.batches_done, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False,
                   disable=not (self.dist.is_main and self.progress))
        t_wait, t0, clips = 0.0, time.perf_counter(), 0
        it = iter(loader)
        for i in range(pg.batches_done, n_batches):
            tw = time.perf_counter()
            # the loader never draws from the global torch RNG (its DataLoader has its own
            # generator, reseeded per (seed, epoch, rank)), so dropout and noise draw the same
            # numbers in a run resumed mid-epoch as in an uninterrupted one
            batch = next(it)
            if self.tc.decode_points == "masked":  # on the host: the device never waits for a count
                batch = with_index(batch, "decode_index", "mask", "eval_mask")
            batch = to_device(batch, self.device)
            t_wait += time.perf_counter() - tw
            boundary = (i + 1) % self.accum == 0 or i + 1 == n_batches
            out, loss, info, total, lam, soft = self.forward_backward(batch, epoch + i / n_batches, boundary)
            bs = M.batch_sums(out, batch, loss.detach(), info, total.detach(), self.W)
            step_sums.add(**bs)
            pg.sums.add(**bs)
            clips += batch["labels"].shape[0]
            codes = out["codes"].detach()
            step_codes.append(codes)
            pg.seen[codes.reshape(-1).long()] = True  # on the device: read at the code-log interval
            bar.update(1)
            if not boundary:
                continue
            grad_norm = self.optimizer_step()
            pg.step += 1
            scalars, hists = {}, {}
            # the epoch's last step always logs: a short run (fewer steps than the interval) still
            # has step figures for check and ablate's plots
            epoch_end = i + 1 == n_batches
            if pg.step % tc.log_interval == 0 or epoch_end:
                scalars = self.step_log(step_sums, out, grad_norm, lam, soft, t_wait, time.perf_counter() - t0, clips)
            if pg.step % tc.code_interval == 0 or epoch_end:
                cs, hists = self.code_log(pg, step_codes, batch, out)
                scalars.update(cs)
            if scalars:
                logger.log(pg.step, epoch, scalars, hists)
                last.update(scalars)
                t_wait, t0, clips = 0.0, time.perf_counter(), 0
                bar.set_postfix(loss=f"{scalars.get('train/loss_step', float('nan')):.3f}",
                                acc=f"{scalars.get('train/acc_step', float('nan')):.3f}",
                                codes=scalars.get("train/unique_codes_step", "-"), refresh=False)
            step_sums, step_codes = Sums(), []
            if scalars:
                heap.trim()  # rows of masked decoding vary per step: freed blocks would pile up
            saved = bool(tc.save_interval) and pg.step % tc.save_interval == 0 and i + 1 < n_batches
            if saved:
                self.save(pg, epoch, i + 1)
                D.barrier()
            # the last batch of the epoch: end_epoch saves, and the caller checks after it
            if i + 1 < n_batches and (signum := self.stop.agreed()):
                bar.close()
                if not saved:
                    self.save(pg, epoch, i + 1)
                    D.barrier()
                raise Stopped(signum, pg.step, self.out_dir, self.dist.world_size)
        bar.close()
        pg.batches_done = 0

    def end_epoch(self, pg: Progress, epoch: int, logger: RunLogger, last: dict, scalars: dict | None = None):
        """Train aggregates (``scalars``: those of a validation a signal interrupted, on resume),
        validation, checkpoints (last.pt; best.pt when the score improved). A stop signal during
        validation saves a checkpoint that records the validation as due and raises Stopped."""
        scalars = dict(scalars) if scalars is not None else M.epoch_scalars(pg.sums.reduced(self.device))
        zc = self.model.zero_codes(self.S).cpu().numpy()
        hists = {}
        if self.val_loader is not None:
            self.val_loader.set_epoch(epoch)
            try:
                # the unwrapped model: no DDP collectives in a forward that a rank may skip
                vs, hists = evaluate(self.model, self.val_loader, self.criterion, self.cfg, self.dist, self.W, zc,
                                     self.autocast, progress=self.dist.is_main and self.progress, where=self.places,
                                     should_stop=self.stop.agreed)
            except Stopped as e:  # from the validation pass: save, then stop with the step
                self.model.train()
                self.save(pg, epoch + 1, 0, val_due={"epoch": epoch, "scalars": scalars})
                D.barrier()
                raise Stopped(e.signum, pg.step, self.out_dir, self.dist.world_size) from None
            scalars.update(vs)
            heap.trim()
        logger.log(pg.step, epoch, scalars, hists)
        last.update(scalars)
        score = scalars.get("val/loss_epoch", scalars["train/loss_epoch"])
        improved = score < pg.best
        pg.best = min(pg.best, score)
        self.save(pg, epoch + 1, 0, best_too=improved)
        if self.dist.is_main:
            print(f"epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k in EPOCH_LINE),
                  file=sys.stderr, flush=True)
        D.barrier()


def final_line(out_dir: Path, last: dict) -> str:
    """The one line a finished run ends with: where best.pt is and what its codes carry."""
    def f(k):
        v = last.get(k)
        return "not logged" if v is None else f"{v:.3f}"
    return (f"done: {out_dir / 'best.pt'}; last validation: code information {f('val/code_info_bits_epoch')} "
            f"bits/label, CE {f('val/ce_bits_epoch')} bits/label, non-centre accuracy {f('val/acc_noncenter_epoch')}")


# the figures of the one line printed per epoch
EPOCH_LINE = ("train/loss_epoch", "train/acc_epoch", "val/loss_epoch", "val/acc_epoch", "val/acc_noncenter_epoch",
              "val/code_info_bits_epoch", "val/ce_bits_epoch")


def train(cfg: Config, data_dir: Path, out_dir: Path, resume: bool = False, dist: D.Dist | None = None,
          debug_codes: bool = False, stop_after_epochs: int | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Run the loop; return the last logged values for callers and tests.

    ``out_dir`` must be new or empty, or hold a run: continued with ``resume``, replaced with
    ``overwrite`` (run_folder). ``debug_codes``: every rank appends its code ids of each
    code-log step to RUN/debug_codes_rank{r}.jsonl. ``stop_after_epochs``: return after that
    many epochs of this call, as if interrupted (tests of exact resume). SIGINT/SIGTERM: a
    checkpoint, then ``Stopped`` (a KeyboardInterrupt) naming the resume command.
    """
    dist = dist or D.Dist()
    out_dir = Path(out_dir)
    if resume:
        if not ckpt.has_last(out_dir):
            raise DataError(f"{out_dir}: nothing to resume (no last.pt)")
        clear = False
    else:
        clear = RF.check_fresh(out_dir, overwrite, ckpt.has_last(out_dir))
    seed_everything(cfg.training.seed)
    build = BuildDir(data_dir)  # before the run folder is touched: a wrong --data leaves nothing behind
    build.check_compatible(W=cfg.data.window_size, what="the config (data.window_size)")
    D.barrier()  # every rank has looked at the folder before rank 0 changes it
    if clear and dist.is_main:
        RF.remove_run(out_dir)
    D.barrier()
    with StopSignals() as stop:
        tr = Trainer(cfg, build, out_dir, dist, debug_codes, progress, stop)
        pg = tr.restore() if resume else Progress()
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and dist.is_main:
            RF.adopt_old_events(out_dir)
        logger = RunLogger(out_dir, enabled=dist.is_main, purge_step=pg.step + 1 if resume else None)
        try:
            tr.write_run_files(logger, pg.step)
            last: dict = {}
            first = pg.epoch
            end = cfg.training.epochs if stop_after_epochs is None else min(cfg.training.epochs,
                                                                            first + stop_after_epochs)
            if resume and dist.is_main:
                total = tr.steps_per_epoch * cfg.training.epochs
                print(f"{out_dir}: resumed at step {pg.step} of {total} (epoch {pg.epoch}"
                      f"{', its validation first' if pg.val_due else ''})", file=sys.stderr, flush=True)
            if pg.val_due:  # a stop signal interrupted that epoch's validation: run it now
                tr.end_epoch(pg, pg.val_due["epoch"], logger, last, scalars=pg.val_due["scalars"])
                pg.val_due = None
            if resume and first >= cfg.training.epochs and dist.is_main:
                print(f"{out_dir}: finished ({cfg.training.epochs} of {cfg.training.epochs} epochs); to train "
                      f"longer: python -m tokenizer_train train --resume {out_dir} --set training.epochs=N "
                      f"(N > {cfg.training.epochs})", file=sys.stderr, flush=True)
            for epoch in range(first, end):
                # a signal during set-up or the previous epoch's validation (end_epoch saved then)
                if signum := stop.agreed():
                    if epoch == first:
                        tr.save(pg, epoch, pg.batches_done)
                        D.barrier()
                    raise Stopped(signum, pg.step, out_dir, dist.world_size)
                tr.train_epoch(pg, epoch, logger, last)
                tr.end_epoch(pg, epoch, logger, last)
            if end == cfg.training.epochs and last:  # the run is complete: compare runs in TensorBoard
                logger.log_hparams(flatten(to_dict(cfg)), {k: v for k, v in last.items() if k.endswith("_epoch")})
                if dist.is_main:
                    print(final_line(out_dir, last), file=sys.stderr, flush=True)
        finally:
            logger.close()
    return last
