"""The validation pass of the trainer and the training-time code information, both on the
evaluation mask (docs/DESIGN.md, Trainer: one mask for every run's validation figures)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from tokenizer_train.common import distributed as D
from tokenizer_train.common.stop import Stopped
from tokenizer_train.evaluate import metrics as M
from tokenizer_train.evaluate.code_info import CODE_INFO_SEED, M_OTHERS, code_info_counts, other_clips
from tokenizer_train.model.model_inputs import entry_clip, flat_index, model_kwargs, take, with_index
from tokenizer_train.evaluate.quality import Quality


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device`` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def decoder_at(model, kw: dict, sel, autocast=None):
    """``decode(quantized) -> (P, W*W)`` logits of a batch's entries at the flat index ``sel``
    (every entry, flattened, for None), with the batch's own start positions ``kw``."""
    def decode(qz):
        with autocast() if autocast else contextlib.nullcontext():
            return take(model.decode(qz, **kw), None) if sel is None else model.decode(qz, **kw, index=sel)
    return decode


@dataclass(frozen=True)
class Evaluator:
    """What a validation pass scores with: the (unwrapped) model, the training criterion, the
    run config, the process group, W, the model's zero codes (a clip's ``L`` code ids), the
    autocast context factory and ``where``: ``clip_places`` of the build."""
    model: torch.nn.Module
    criterion: object
    cfg: object
    dist: object
    W: int
    zero_codes: np.ndarray
    autocast: object
    where: dict | None = None


@torch.no_grad()
def evaluate(ev: Evaluator, loader, progress: bool = False, should_stop=None) -> tuple[dict, dict]:
    """``val/*_epoch`` scalars and code-usage histograms of one pass over ``loader`` (a
    progress bar on stderr with ``progress``), after an encoder pass that gives code
    information every clip's codes (``code_pool``).

    Every figure (loss, CE, accuracies, code information, AUC, EPE) is on ``eval_mask``;
    ``val/dynamic_point_ratio_epoch`` describes the run's own filter (``mask``).
    ``should_stop()`` (collective: every rank calls it once a batch) returning a signal number
    ends the pass with ``Stopped`` (no step: the caller saves).
    """
    model, criterion, dist, autocast = ev.model, ev.criterion, ev.dist, ev.autocast
    model.eval()
    t0 = time.perf_counter()
    q, codes = Quality(ev.W), []
    loss_sum = n_sum = kept = points = clips = 0.0
    masked = ev.cfg.training.decode_points == "masked"
    pool, row, others = code_pool(model, loader, ev.where, dist, autocast, should_stop)
    for batch in tqdm(loader, desc="validation", unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
        _check(should_stop)
        if len(batch["clip_id"]) == 0:
            continue  # an empty share of a tiny validation split under DDP
        batch = to_device(with_index(batch, "eval_index", "eval_mask") if masked else batch, dist.device)
        kw, sel = model_kwargs(batch), batch.get("eval_index")
        lab, m = take(batch["labels"], sel), take(batch["eval_mask"], sel)
        with autocast():
            out = model.encode(batch["velocities"], **kw)
            decode = decoder_at(model, kw, sel, autocast)
            logits = decode(out["quantized"])
            loss, info = criterion(logits, lab, m)
        n = float(info["count"])
        loss_sum, n_sum = loss_sum + float(loss) * n, n_sum + n
        k, p = M.dynamic_point_counts(batch["mask"])
        kept, points, clips = kept + k, points + p, clips + len(batch["clip_id"])
        info = code_info_counts(decode, out["quantized"], pool, others[[row[c] for c in batch["clip_id"]]], lab, m,
                                entry_clip(sel, batch["labels"].shape).to(lab.device), own_logits=logits)
        q.add(logits.float(), lab, take(batch["velocities"], sel), m, info, out["z_bounded"])
        codes.append(out["codes"].reshape(-1))
    loss_sum, n_sum, kept, points, clips = D.all_reduce_sum([loss_sum, n_sum, kept, points, clips], dist.device)
    # one CE: val/ce_bits_epoch (raw logits, bits) is the quality figure; val/loss_epoch is the
    # training objective on the evaluation mask (weighted, focal, logit-adjusted as configured)
    scalars = {"val/loss_epoch": M.ratio((loss_sum, n_sum)),
               **q.reduce(dist.device).scalars("val", "epoch"),
               "val/dynamic_point_ratio_epoch": M.ratio((kept, points)),
               # the split's clips (all ranks) per second of the whole pass, code_pool's included
               "perf/val_clips_per_s_epoch": clips / max(time.perf_counter() - t0, 1e-9)}
    all_codes = D.gather_codes(torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int64, device=dist.device))
    hists = {}
    if all_codes.size:
        L = len(ev.zero_codes)
        cs, hists = M.code_scalars("val", "epoch", all_codes.reshape(-1, L), ev.cfg.model.fsq_levels, ev.zero_codes)
        scalars.update(cs)
    model.train()
    return scalars, hists


@torch.no_grad()
def _check(should_stop):
    if should_stop is not None and (signum := should_stop()):
        raise Stopped(signum)


def code_pool(model, loader, where: dict | None, dist, autocast, should_stop=None) -> tuple[torch.Tensor, dict, np.ndarray]:
    """The codes code information decodes with: every clip of one pass over ``loader`` (all
    ranks), encoded in eval mode, as ``(quantized (C, L, d) on the device, {clip id: row},
    other_clips of the rows)``; ``where``: clip id -> (split group, start frame), ``clip_places``.
    Rows are sorted by clip id, so neither the batch size nor the order of the pass changes
    which clips pair up (docs/DESIGN.md, Metrics)."""
    model.eval()
    ids, qs, frames = [], [], 0
    for batch in loader:
        _check(should_stop)
        if len(batch["clip_id"]) == 0:
            continue
        b = to_device(batch, dist.device)
        with autocast():
            qs.append(model.encode(b["velocities"], **model_kwargs(b))["quantized"].float().cpu())
        ids += batch["clip_id"]
        frames = batch["labels"].shape[1] + 1
    merged: dict = {}
    # one tensor a rank; every rank pairs the same clips the same way (frames from any rank that has clips)
    for part_ids, part_q, part_frames in D.gather_object((ids, torch.cat(qs) if qs else None, frames)):
        merged.update(zip(part_ids, part_q) if part_q is not None else ())
        frames = max(frames, part_frames)
    ids = sorted(merged)
    row = {c: i for i, c in enumerate(ids)}
    pool = torch.stack([merged[c] for c in ids]).to(dist.device) if ids else torch.zeros(0)
    return pool, row, pair_up(ids, where, frames)


def clip_places(build) -> dict:
    """``{clip id: (split group, start frame)}`` of a build: what ``other_clips`` pairs by."""
    man = build.manifest(["clip_id", "split_group", "start_frame"])
    return {c: (g, int(s)) for c, g, s in zip(man["clip_id"], man["split_group"], man["start_frame"])}


def pair_up(ids: list, where: dict | None, frames: int) -> np.ndarray:
    """``other_clips`` of the clips ``ids`` (each its own group when ``where`` is None)."""
    if where is None:
        return other_clips(ids, M_OTHERS, CODE_INFO_SEED)
    places = [where[c] for c in ids]
    return other_clips([p[0] for p in places], M_OTHERS, CODE_INFO_SEED, [p[1] for p in places], frames)


@torch.no_grad()
def train_code_info(model, batch: dict, quantized: torch.Tensor, device, where: dict | None = None) -> float:
    """``train/code_info_bits_step``: code information of a training batch's codes on its
    ``eval_mask``, decoded in eval mode (no dropout: the training RNG stream is untouched),
    summed over ranks (collective); nan (logged as null) when no clip has another clip of
    another split group in the batch.

    The first M + 1 clips of the batch are scored, each against M other clips of the batch
    chosen by the validation's rule (``pair_up``: clips that share no frame): (M + 1)^2 clip
    decodes whatever the batch size.
    """
    was = model.training
    model.eval()
    try:
        r = M_OTHERS + 1
        ids = list(batch["clip_id"])
        others = pair_up(ids, where, batch["labels"].shape[1] + 1)[:r]
        kw = {k: v[:r] for k, v in model_kwargs(batch).items()}
        m = batch["eval_mask"][:r]
        # a code-log step reads the host anyway: the index may count on the device here
        sel = flat_index(m) if "decode_index" in batch else None
        s, n = code_info_counts(decoder_at(model, kw, sel), quantized[:r].detach().float(),
                                quantized.detach().float(), others, take(batch["labels"][:r], sel), take(m, sel),
                                entry_clip(sel, m.shape).to(m.device))
    finally:
        model.train(was)
    s, n = D.all_reduce_sum([s, n], device)
    return s / n if n else float("nan")  # no clip had another's codes: no estimate
