"""Train a motion tokenizer on a build folder (also under ``torchrun``).

  python -m tokenizer_train train --config configs/base.yaml --data BUILD --out RUN
  torchrun --nproc-per-node 2 -m tokenizer_train train --config ... --data BUILD --out RUN
  python -m tokenizer_train train --resume RUN          # continue exactly where RUN stopped

RUN receives config.yaml (the resolved config), run.json, metrics.jsonl (one JSON object per
log event), tensorboard/ (event files), last.pt (and last.prev.pt, the one before it) and
best.pt (lowest val/loss_epoch).

Interruptions: a run killed at any moment resumes with --resume RUN from its newest readable
checkpoint (last.pt, else last.prev.pt); every rank's RNG state, loss sums and code counts
are in it, so on CPU with the same world size the continuation is bit-exact. The rows of
metrics.jsonl logged after that checkpoint are dropped on resume (they are logged again).
Override any config key with --set a.b=value (repeatable); an unknown key is an error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from motion_data.atomic import atomic_write_json, atomic_write_text
from motion_data.labels import center_class
from motion_data.loader import make_loader, read_build_info
from motion_data.workers import resolve_workers

from . import checkpoint as ckpt
from . import distributed as D
from . import metrics as M
from . import prior
from .config import Config, ConfigError, load_config, to_dict
from .logger import RunLogger
from .code_usage import CodeUsageRegulariser
from .metrics import code_scalars
from .losses import Criterion, class_counts_from_stats, class_weights_image, entropy_weight, save_class_weights
from .model import MotionTokenizer
from .model_inputs import model_kwargs
from .schedule import build_scheduler, clip_gradients
from .validate import evaluate, to_device, train_code_info


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--config", help="YAML config (default: built-in defaults; with --resume: RUN/config.yaml)")
    p.add_argument("--data", help="build folder from `python -m preprocess build-shards` (with --resume: as recorded in RUN/run.json)")
    p.add_argument("--out", help="run folder to create or continue (with --resume: RUN)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.epochs=5 (repeatable; value parsed as YAML)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt: model, optimizer, scheduler, "
                   "grad scaler, sampler position, RNG states, step and epoch")
    p.add_argument("--debug-codes", action="store_true",
                   help="each rank also appends its code ids of every code-log step to RUN/debug_codes_rank<r>.jsonl "
                        "(to check the *_global statistics)")


def run(args) -> int:
    try:
        cfg, data_dir, out_dir, resume = _resolve(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = D.init(cfg.training.device)
    try:
        train(cfg, data_dir, out_dir, resume=resume, dist=dist, debug_codes=args.debug_codes)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        D.cleanup()
    return 0


def _resolve(args):
    """(config, data dir, run dir, resume?) from the command line and, on resume, the run."""
    if args.resume:
        run_dir = Path(args.resume)
        if not ckpt.has_last(run_dir):
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no last.pt)")
        if args.out and Path(args.out) != run_dir:
            raise ValueError("--out must be omitted or equal to --resume RUN")
        try:
            recorded = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{run_dir / 'run.json'}: unreadable ({' '.join(str(e).split())})") from None
        cfg = load_config(args.config or run_dir / "config.yaml", args.set)
        return cfg, Path(args.data or recorded["data"]), run_dir, True
    if not args.data or not args.out:
        raise ValueError("--data and --out are required (or --resume RUN)")
    return load_config(args.config, args.set), Path(args.data), Path(args.out), False


def autocast_for(mode: str, device: torch.device):
    if mode == "no":
        return contextlib.nullcontext()
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("training.mixed_precision fp16 needs CUDA (its GradScaler is CUDA-only); use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


def make_loaders(data_dir, cfg: Config, rank: int, world_size: int, device: torch.device = torch.device("cpu")):
    """(train loader, val loader or None) of the build under the config's data section."""
    dc, tc = cfg.data, cfg.training
    workers = resolve_workers(dc.num_workers, device.type)  # "auto" depends on the device
    common = dict(static_filter=dc.static_filter, batch_size=tc.batch_size, num_workers=workers,
                  seed=tc.seed, rank=rank, world_size=world_size, val_split=dc.val_split,
                  persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    train = make_loader(data_dir, split="train", sampler=dc.sampler, augment=dc.augment, **common)
    val = make_loader(data_dir, split="val", **common) if dc.val_split > 0 else None
    return train, val


def _trim_metrics(path: Path, step: int):
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (those the resumed checkpoint has
    seen); later ones, and a line torn by a kill, are logged again by the resumed run."""
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


def _rank_state(st: dict, dist, start_batch: int) -> dict | None:
    """This rank's part of a checkpoint (RNG, loss sums, codes seen, skipped samples).

    None when the checkpoint comes from another world size at an epoch boundary (the rank
    keeps its fresh seed; the continuation is then not bit-exact); an error mid-epoch.
    """
    ranks = st.get("ranks") or [{"rng": st["rng"], "epoch_sums": st["epoch_sums"], "seen": st["seen"],
                                 "skipped": st["loader"].get("skipped", 0)}]
    if len(ranks) == dist.world_size:
        return ranks[dist.rank]
    if start_batch:
        raise ValueError(f"the checkpoint was taken mid-epoch by {len(ranks)} processes; resume it with "
                         f"{len(ranks)} (now {dist.world_size})")
    return None


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Sums:
    """Exact (sum, count) accumulators for a step, an epoch or a validation pass."""

    KEYS = ("loss", "ce", "total", "count", "correct", "nc_correct", "nc_count", "epe", "epe_count",
            "kept", "points", "clips", "e_correct", "e_count")

    def __init__(self, values=None):
        self.v = dict.fromkeys(self.KEYS, 0.0) | dict(values or {})

    def add(self, **kw):
        for k, x in kw.items():
            self.v[k] += float(x)

    def reduced(self, device) -> dict:
        return dict(zip(self.KEYS, D.all_reduce_sum([self.v[k] for k in self.KEYS], device)))


def batch_sums(out, batch, loss, info, total, W) -> dict:
    logits, labels, mask = out["logits"], batch["labels"], batch["mask"]
    n = float(info["count"])
    pred = logits.detach().argmax(-1)
    c, m = M.accuracy_counts(pred, labels, mask)
    nc, nm = M.noncenter_counts(pred, labels, mask, center_class(W))
    kept, pts = M.dynamic_point_counts(mask)
    ec, en = M.accuracy_counts(pred, labels, batch["eval_mask"])  # train/acc_evalmask_epoch: check's gate
    return dict(loss=float(loss) * n, ce=float(info["ce"]) * n, total=float(total) * n, count=n,
                correct=c, nc_correct=nc, nc_count=nm, kept=kept, points=pts, clips=labels.shape[0],
                e_correct=ec, e_count=en)


# ---------------------------------------------------------------------------- training
def train(cfg: Config, data_dir: Path, out_dir: Path, resume: bool = False, dist: D.Dist | None = None,
          debug_codes: bool = False, stop_after_epochs: int | None = None, progress: bool = True) -> dict:
    """Run the loop; return the last logged values for callers and tests.

    ``debug_codes``: every rank appends its code ids of each code-log step to
    RUN/debug_codes_rank{r}.jsonl.
    ``stop_after_epochs``: return after that many epochs of this call, as if interrupted
    (tests of exact resume).
    """
    dist = dist or D.Dist()
    tc, device = cfg.training, dist.device
    out_dir = Path(out_dir)
    if not resume and ckpt.has_last(out_dir):
        raise ValueError(f"{out_dir}: already holds a run (last.pt); use --resume {out_dir} or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(tc.seed)

    # data
    info = read_build_info(data_dir)
    W, N, S = info["W"], info["N"], info["T"] - 1
    if W != cfg.data.window_size:
        raise ValueError(f"{data_dir}: build has W={W} but data.window_size={cfg.data.window_size}")
    train_loader, val_loader = make_loaders(data_dir, cfg, dist.rank, dist.world_size, device)

    # model, optimisation
    model = MotionTokenizer(cfg.model, num_points=N, window_size=W).to(device)
    levels, K = cfg.model.fsq_levels, model.codebook_size
    L = S * model.tokens_per_step  # tokens per clip (model.groups per step)
    seed_everything(tc.seed + 1000 * dist.rank)  # dropout and noise differ between ranks
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                         broadcast_buffers=False)
           if dist.enabled else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    accum = tc.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    scheduler = build_scheduler(optimizer, tc.lr_schedule, steps_per_epoch * tc.epochs, tc.learning_rate)
    autocast_for(tc.mixed_precision, device)  # fail now on fp16 without CUDA
    scaler = torch.amp.GradScaler("cuda", enabled=tc.mixed_precision == "fp16")
    counts = class_counts_from_stats(data_dir, cfg.data.static_filter, W) if tc.class_weighting.method != "none" else None
    criterion = prior.wrap(Criterion(tc, counts, W), tc)  # training.logit_adjustment (off: unchanged)
    regulariser = CodeUsageRegulariser(tc, levels, distributed=dist.enabled)  # its running average is checkpointed

    # state (restored on resume)
    step, start_epoch, start_batch, best = 0, 0, 0, math.inf
    epoch_sums, seen, seen_g = Sums(), np.zeros(K, bool), np.zeros(K, bool)
    if resume:
        st, used, problems = ckpt.load_latest(out_dir / "last.pt")
        if dist.is_main:
            for msg in problems:
                print(f"warning: {msg}; resuming from {used}", file=sys.stderr, flush=True)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        regulariser.load_state_dict(st.get("code_usage", {}))
        step, start_epoch, start_batch, best = st["step"], st["epoch"], st["batches_done"], st["best_val"]
        mine = _rank_state(st, dist, start_batch)
        if start_batch:
            epoch_sums = Sums(mine["epoch_sums"])
            seen, seen_g = mine["seen"].numpy(), st["seen_global"].numpy()
        train_loader.load_state_dict({**st["loader"], "skipped": mine["skipped"] if mine else 0})
        if mine is not None:
            ckpt.set_rng_state(mine["rng"])
        elif dist.is_main:
            print(f"warning: {used} comes from another world size: fresh per-rank RNG seeds", file=sys.stderr)
        if dist.is_main:
            _trim_metrics(out_dir / "metrics.jsonl", step)
            ckpt.remove_stale_temps(out_dir)
    logger = RunLogger(out_dir, enabled=dist.is_main, purge_step=step + 1 if resume else None)
    if dist.is_main and criterion.class_weights is not None:
        w = criterion.class_weights.detach().cpu().numpy()
        save_class_weights(out_dir / "class_weights", w, W, meta={"method": tc.class_weighting.method})
        logger.writer.add_image("train/class_weights", class_weights_image(w, W), 0)
    if dist.is_main:
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_json(out_dir / "run.json", {
            "data": str(data_dir), "world_size": dist.world_size, "W": W, "N": N, "T": info["T"],
            "codebook_size": K, "train_batches_per_epoch": len(train_loader), "steps_per_epoch": steps_per_epoch,
            "parameters": sum(p.numel() for p in model.parameters())})

    def rank_states(sums, seen) -> list:
        """Every rank's own state (collective: all ranks call it at the same point)."""
        return D.gather_object({"rng": ckpt.rng_state(), "epoch_sums": dict(sums.v),
                                "seen": torch.from_numpy(seen.copy()), "skipped": int(train_loader.skipped)})

    def state(epoch, batches_done, sums, seen, seen_g, ranks):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "code_usage": regulariser.state_dict(), "rng": ranks[0]["rng"], "ranks": ranks, "world_size": dist.world_size,
                "step": step, "epoch": epoch,
                "batches_done": batches_done, "best_val": best, "epoch_sums": sums.v,
                "seen": torch.from_numpy(seen.copy()), "seen_global": torch.from_numpy(seen_g.copy()),
                "loader": {"epoch": epoch, "batches_done": batches_done, "skipped": train_loader.skipped},
                "config": to_dict(cfg), "meta": {"W": W, "N": N, "T": info["T"], "levels": list(levels)}}

    last: dict = {}
    end_epoch = tc.epochs if stop_after_epochs is None else min(tc.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        train_loader.set_epoch(epoch)  # keeps a resumed mid-epoch position
        if start_batch == 0:
            epoch_sums, seen, seen_g = Sums(), np.zeros(K, bool), np.zeros(K, bool)
        step_sums, step_codes, step_extra = Sums(), [], {}
        n_batches = len(train_loader)
        net.train()
        bar = tqdm(total=n_batches, initial=start_batch, desc=f"epoch {epoch}", disable=not (dist.is_main and progress),
                   dynamic_ncols=True, leave=False)
        t_wait, t0, clips_since_log = 0.0, time.perf_counter(), 0
        it = iter(train_loader)
        for i in range(start_batch, n_batches):
            tw = time.perf_counter()
            # the loader never draws from the global torch RNG (its DataLoader has its own
            # generator, reseeded per (seed, epoch, rank)), so dropout and noise draw the same
            # numbers in a run resumed mid-epoch as in an uninterrupted one
            batch = next(it)
            batch = to_device(batch, device)
            t_wait += time.perf_counter() - tw
            boundary = (i + 1) % accum == 0 or i + 1 == n_batches
            sync = contextlib.nullcontext() if (boundary or not dist.enabled) else net.no_sync()
            with sync:
                with autocast_for(tc.mixed_precision, device):
                    out = net(batch["velocities"], **model_kwargs(batch))
                    loss, linfo = criterion(out["logits"], batch["labels"], batch["mask"])
                    lam = entropy_weight(tc.code_entropy_weight, tc.code_entropy_warmup_epochs, epoch + i / n_batches)
                    total = loss
                    if lam > 0:
                        term, soft = regulariser(out["z_bounded"])
                        total = loss + lam * term
                        step_extra["train/code_entropy_soft_step"] = float(soft)
                scaler.scale(total / accum).backward()
            bs = batch_sums(out, batch, loss.detach(), linfo, total.detach(), W)
            step_sums.add(**bs)
            clips_since_log += bs["clips"]
            epoch_sums.add(**bs)
            step_codes.append(out["codes"].detach())
            step_extra["train/quant_input_std_step"] = float(out["quant_in"].detach().float().std())
            M.update_seen(seen, out["codes"].detach().cpu().numpy())
            bar.update(1)
            if not boundary:
                continue

            # optimizer step
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(model.parameters(), tc.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1

            scalars, hists = {}, {}
            if step % tc.log_interval == 0:
                r = step_sums.reduced(device)
                elapsed = time.perf_counter() - t0
                scalars.update({
                    "train/loss_step": M.ratio((r["loss"], r["count"])),
                    "train/ce_step": M.ratio((r["ce"], r["count"])),
                    "train/loss_total_step": M.ratio((r["total"], r["count"])),
                    "train/total_loss_step": M.ratio((r["total"], r["count"])),
                    "train/acc_step": M.ratio((r["correct"], r["count"])),
                    "train/acc_noncenter_step": M.ratio((r["nc_correct"], r["nc_count"])),
                    "train/dynamic_point_ratio_step": M.ratio((r["kept"], r["points"])),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/code_entropy_weight": lam,
                    "train/quant_input_tanh_scale": model.shaping.scale_value(),
                    "perf/loader_wait_share": t_wait / max(elapsed, 1e-9),
                    "perf/clips_per_s": clips_since_log * dist.world_size / max(elapsed, 1e-9),
                    **step_extra,
                })
            if step % tc.code_interval == 0:
                codes = torch.cat([c.reshape(-1, L) for c in step_codes])
                zc = model.zero_codes(S).cpu().numpy()
                local = codes.cpu().numpy()
                gathered = D.gather_codes(codes).reshape(-1, L)
                seen_g = D.all_reduce_any(seen_g | seen, device)
                cs, ch = code_scalars("train", "step", local, levels, zc, seen)
                gs, gh = code_scalars("train", "step", gathered, levels, zc, seen_g, tag_suffix="_global")
                scalars.update(cs | gs)
                scalars["train/code_info_bits_step"] = train_code_info(model, batch, out["quantized"], device)
                hists.update(ch | gh)
                if debug_codes:  # each rank's own codes: a test recomputes the *_global statistics
                    with open(out_dir / f"debug_codes_rank{dist.rank}.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, "codes": local.tolist()}) + "\n")
            if scalars:
                logger.log(step, epoch, scalars, hists)
                last.update(scalars)
                t_wait, t0, clips_since_log = 0.0, time.perf_counter(), 0
                step_sums_for_bar = scalars
                bar.set_postfix(loss=f"{step_sums_for_bar.get('train/loss_step', float('nan')):.3f}",
                                acc=f"{step_sums_for_bar.get('train/acc_step', float('nan')):.3f}",
                                codes=step_sums_for_bar.get("train/unique_codes_step", "-"), refresh=False)
            step_sums, step_codes, step_extra = Sums(), [], {}
            if tc.save_interval and step % tc.save_interval == 0 and i + 1 < n_batches:
                ranks = rank_states(epoch_sums, seen)
                if dist.is_main:
                    ckpt.save_last(out_dir / "last.pt", state(epoch, i + 1, epoch_sums, seen, seen_g, ranks))
                D.barrier()
        bar.close()
        start_batch = 0

        # end of epoch: train aggregates, validation, checkpoints
        r = epoch_sums.reduced(device)
        scalars = {"train/loss_epoch": M.ratio((r["loss"], r["count"])),
                   "train/acc_epoch": M.ratio((r["correct"], r["count"])),
                   "train/acc_evalmask_epoch": M.ratio((r["e_correct"], r["e_count"])),
                   "train/acc_noncenter_epoch": M.ratio((r["nc_correct"], r["nc_count"])),
                   "train/dynamic_point_ratio_epoch": M.ratio((r["kept"], r["points"]))}
        zc = model.zero_codes(S).cpu().numpy()
        hists = {}
        if val_loader is not None:
            val_loader.set_epoch(epoch)
            # the unwrapped model: no DDP collectives in a forward that a rank may skip
            vs, hists = evaluate(model, val_loader, criterion, cfg, dist, W, zc,
                                 lambda: autocast_for(tc.mixed_precision, device))
            scalars.update(vs)
        logger.log(step, epoch, scalars, hists)
        last.update(scalars)
        score = scalars.get("val/loss_epoch", scalars["train/loss_epoch"])
        improved = score < best
        best = min(best, score)
        ranks = rank_states(Sums(), np.zeros(K, bool))
        if dist.is_main:
            st = state(epoch + 1, 0, Sums(), np.zeros(K, bool), np.zeros(K, bool), ranks)
            ckpt.save_last(out_dir / "last.pt", st)
            if improved:
                ckpt.save(out_dir / "best.pt", st)
            print(f"epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                                                 if k in ("train/loss_epoch", "train/acc_epoch", "val/loss_epoch",
                                                          "val/acc_epoch", "val/acc_noncenter_epoch",
                                                          "val/code_info_bits_epoch", "val/ce_bits_epoch")),
                  file=sys.stderr, flush=True)
        D.barrier()
    logger.close()
    return last

