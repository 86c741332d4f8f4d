"""The training loop: ``train`` runs a ``Trainer``'s steps epoch by epoch, validates and
checkpoints (docs/DESIGN.md, Trainer). The command line is ``command.py``.

RUN receives config.yaml, run.json, metrics.jsonl, TensorBoard event files, last.pt (and
last.prev.pt) and best.pt (lowest val/loss_epoch). A stop signal saves and raises ``Stopped``
at the next step boundary, or during a validation (then recorded as due, and run first on resume).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError

from tokenizer_train.common import distributed as D
from tokenizer_train.common.config import Config, flatten, to_dict
from tokenizer_train.common.stop import StopSignals, Stopped
from tokenizer_train.evaluate import metrics as M
from tokenizer_train.evaluate.code_usage import CodeUsageRegulariser, entropy_weight
from tokenizer_train.evaluate.metrics import Sums
from tokenizer_train.evaluate.validate import Evaluator, clip_places, evaluate, to_device
from tokenizer_train.model import checkpoint as ckpt
from tokenizer_train.model.model import MotionTokenizer
from tokenizer_train.model.model_inputs import model_kwargs, take, with_index
from tokenizer_train.train import heap, prior, run_folder as RF, run_state
from tokenizer_train.train.class_weights import training_class_counts
from tokenizer_train.train.logger import RunLogger
from tokenizer_train.train.losses import Criterion
from tokenizer_train.train.run_state import Progress
from tokenizer_train.train.schedule import build_scheduler, clip_gradients
from tokenizer_train.train.setup import autocast_for, make_loaders, seed_everything
from tokenizer_train.train.step_logs import Pace, code_scalars, step_scalars


class MicroStep(NamedTuple):
    """What one micro-batch's forward and backward give."""
    out: dict
    loss: torch.Tensor
    info: dict
    total: torch.Tensor
    lam: float
    soft: torch.Tensor | None


@dataclass(frozen=True)
class Hooks:
    """For tests and debugging: ``debug_codes``: every rank appends its code ids of each
    code-log step to RUN/debug_codes_rank{r}.jsonl; ``stop_after_epochs``: return after that
    many epochs of this call, as if interrupted."""
    debug_codes: bool = False
    stop_after_epochs: int | None = None


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

    def forward_backward(self, batch, epoch_float: float, sync: bool) -> MicroStep:
        """One micro-batch: forward, loss, backward."""
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
        return MicroStep(out, loss, info, total, lam, soft)

    def optimizer_step(self) -> torch.Tensor:
        """Unscale, clip, step, zero, advance the schedule; the pre-clip gradient norm (on the device)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.tc.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm


def train_epoch(tr, pg: Progress, epoch: int, logger: RunLogger, last: dict):
    """The optimizer steps of one epoch from ``pg.batches_done``; no host sync on a step
    that logs nothing: sums and codes seen stay on the device."""
    loader = tr.train_loader
    loader.set_epoch(epoch)  # keeps a resumed mid-epoch position
    if pg.batches_done == 0:
        pg.new_epoch(tr.K, tr.device)
    step_sums, step_codes = Sums(), []
    n_batches = len(loader)
    tr.net.train()
    bar = tqdm(total=n_batches, initial=pg.batches_done, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False,
               disable=not (tr.dist.is_main and tr.progress))
    pace = Pace()
    it = iter(loader)
    for i in range(pg.batches_done, n_batches):
        tw = time.perf_counter()
        # the loader never draws from the global torch RNG (its DataLoader has its own
        # generator, reseeded per (seed, epoch, rank)), so dropout and noise draw the same
        # numbers in a run resumed mid-epoch as in an uninterrupted one
        batch = next(it)
        if tr.tc.decode_points == "masked":  # on the host: the device never waits for a count
            batch = with_index(batch, "decode_index", "mask", "eval_mask")
        batch = to_device(batch, tr.device)
        pace.wait += time.perf_counter() - tw
        boundary = (i + 1) % tr.accum == 0 or i + 1 == n_batches
        micro = tr.forward_backward(batch, epoch + i / n_batches, boundary)
        bs = M.batch_sums(micro.out, batch, micro.loss.detach(), micro.info, micro.total.detach(), tr.W)
        step_sums.add(**bs)
        pg.sums.add(**bs)
        pace.clips += batch["labels"].shape[0]
        codes = micro.out["codes"].detach()
        step_codes.append(codes)
        pg.seen[codes.reshape(-1).long()] = True  # on the device: read at the code-log interval
        bar.update(1)
        if not boundary:
            continue
        grad_norm = tr.optimizer_step()
        pg.step += 1
        scalars, hists = {}, {}
        # the epoch's last step always logs: a short run (fewer steps than the interval) still
        # has step figures for check and ablate's plots
        epoch_end = i + 1 == n_batches
        if pg.step % tr.tc.log_interval == 0 or epoch_end:
            scalars = step_scalars(tr, step_sums, micro, grad_norm, pace)
        if pg.step % tr.tc.code_interval == 0 or epoch_end:
            cs, hists = code_scalars(tr, pg, step_codes, batch, micro.out)
            scalars.update(cs)
        if scalars:
            logger.log(pg.step, epoch, scalars, hists)
            last.update(scalars)
            pace = Pace()
            bar.set_postfix(loss=f"{scalars.get('train/loss_step', float('nan')):.3f}",
                            acc=f"{scalars.get('train/acc_step', float('nan')):.3f}",
                            codes=scalars.get("train/unique_codes_step", "-"), refresh=False)
            heap.trim()  # rows of masked decoding vary per step: freed blocks would pile up
        step_sums, step_codes = Sums(), []
        if i + 1 < n_batches:  # the epoch's last batch: end_epoch saves, and the caller checks after it
            _save_or_stop(tr, pg, epoch, i + 1, bar)
    bar.close()
    pg.batches_done = 0


def _save_or_stop(tr, pg: Progress, epoch: int, batches_done: int, bar):
    """Within an epoch: the periodic checkpoint; on an agreed stop signal a checkpoint (unless
    just written), then ``Stopped``."""
    saved = bool(tr.tc.save_interval) and pg.step % tr.tc.save_interval == 0
    if saved:
        run_state.save(tr, pg, epoch, batches_done)
        D.barrier()
    if signum := tr.stop.agreed():
        bar.close()
        if not saved:
            run_state.save(tr, pg, epoch, batches_done)
            D.barrier()
        raise Stopped(signum, pg.step, tr.out_dir, tr.dist.world_size)


def end_epoch(tr, pg: Progress, epoch: int, logger: RunLogger, last: dict, scalars: dict | None = None):
    """Train aggregates (``scalars``: those of a validation a signal interrupted, on resume),
    validation, checkpoints (last.pt; best.pt when the score improved). A stop signal during
    validation saves a checkpoint that records the validation as due and raises Stopped."""
    scalars = dict(scalars) if scalars is not None else M.epoch_scalars(pg.sums.reduced(tr.device))
    hists = {}
    if tr.val_loader is not None:
        tr.val_loader.set_epoch(epoch)
        # the unwrapped model: no DDP collectives in a forward that a rank may skip
        zc = tr.model.zero_codes(tr.S).cpu().numpy()
        ev = Evaluator(tr.model, tr.criterion, tr.cfg, tr.dist, tr.W, zc, tr.autocast, tr.places)
        try:
            vs, hists = evaluate(ev, tr.val_loader, progress=tr.dist.is_main and tr.progress,
                                 should_stop=tr.stop.agreed)
        except Stopped as e:  # from the validation pass: save, then stop with the step
            tr.model.train()
            run_state.save(tr, pg, epoch + 1, 0, val_due={"epoch": epoch, "scalars": scalars})
            D.barrier()
            raise Stopped(e.signum, pg.step, tr.out_dir, tr.dist.world_size) from None
        scalars.update(vs)
        heap.trim()
    logger.log(pg.step, epoch, scalars, hists)
    last.update(scalars)
    score = scalars.get("val/loss_epoch", scalars["train/loss_epoch"])
    improved = score < pg.best
    pg.best = min(pg.best, score)
    run_state.save(tr, pg, epoch + 1, 0, best_too=improved)
    if tr.dist.is_main:
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
          progress: bool = True, overwrite: bool = False, hooks: Hooks = Hooks()) -> dict:
    """Run the loop; return the last logged values for callers and tests.

    ``out_dir`` must be new or empty, or hold a run: continued with ``resume``, replaced with
    ``overwrite`` (run_folder). SIGINT/SIGTERM: a checkpoint, then ``Stopped`` (a
    KeyboardInterrupt) naming the resume command.
    """
    dist, out_dir = dist or D.Dist(), Path(out_dir)
    build = _open_folders(cfg, data_dir, out_dir, resume, overwrite, dist)
    with StopSignals() as stop:
        tr = Trainer(cfg, build, out_dir, dist, hooks.debug_codes, progress, stop)
        pg = run_state.restore(tr) if resume else Progress()
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and dist.is_main:
            RF.adopt_old_events(out_dir)
        logger = RunLogger(out_dir, enabled=dist.is_main, purge_step=pg.step + 1 if resume else None)
        try:
            run_state.write_run_files(tr, logger, pg.step)
            return _epochs(tr, pg, logger, resume, hooks.stop_after_epochs)
        finally:
            logger.close()


def _open_folders(cfg: Config, data_dir, out_dir: Path, resume: bool, overwrite: bool, dist: D.Dist) -> BuildDir:
    """The build, checked before the run folder is touched (a wrong --data leaves nothing
    behind); then a replaced run's files are removed."""
    if resume:
        if not ckpt.has_last(out_dir):
            raise DataError(f"{out_dir}: nothing to resume (no last.pt)")
        clear = False
    else:
        clear = RF.check_fresh(out_dir, overwrite, ckpt.has_last(out_dir))
    seed_everything(cfg.training.seed)
    build = BuildDir(data_dir)
    build.check_compatible(W=cfg.data.window_size, what="the config (data.window_size)")
    D.barrier()  # every rank has looked at the folder before rank 0 changes it
    if clear and dist.is_main:
        RF.remove_run(out_dir)
    D.barrier()
    return build


def _epochs(tr: Trainer, pg: Progress, logger: RunLogger, resume: bool, stop_after: int | None) -> dict:
    """The epochs from where ``pg`` stands (a validation left due first); the last logged values."""
    epochs, out_dir, dist, last = tr.tc.epochs, tr.out_dir, tr.dist, {}
    first = pg.epoch
    end = epochs if stop_after is None else min(epochs, first + stop_after)
    if resume and dist.is_main:
        print(f"{out_dir}: resumed at step {pg.step} of {tr.steps_per_epoch * epochs} (epoch {pg.epoch}"
              f"{', its validation first' if pg.val_due else ''})", file=sys.stderr, flush=True)
    if pg.val_due:  # a stop signal interrupted that epoch's validation: run it now
        end_epoch(tr, pg, pg.val_due["epoch"], logger, last, scalars=pg.val_due["scalars"])
        pg.val_due = None
    if resume and first >= epochs and dist.is_main:
        print(f"{out_dir}: finished ({epochs} of {epochs} epochs); to train longer: python -m tokenizer_train "
              f"train --resume {out_dir} --set training.epochs=N (N > {epochs})", file=sys.stderr, flush=True)
    for epoch in range(first, end):
        # a signal during set-up or the previous epoch's validation (end_epoch saved then)
        if signum := tr.stop.agreed():
            if epoch == first:
                run_state.save(tr, pg, epoch, pg.batches_done)
                D.barrier()
            raise Stopped(signum, pg.step, out_dir, dist.world_size)
        train_epoch(tr, pg, epoch, logger, last)
        end_epoch(tr, pg, epoch, logger, last)
    if end == epochs and last:  # the run is complete: compare runs in TensorBoard
        logger.log_hparams(flatten(to_dict(tr.cfg)), {k: v for k, v in last.items() if k.endswith("_epoch")})
        if dist.is_main:
            print(final_line(out_dir, last), file=sys.stderr, flush=True)
    return last
