"""The validation pass of the trainer and the training-time code information, both on the
evaluation mask (docs/DESIGN.md, Trainer: one mask for every run's validation figures)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from . import distributed as D
from . import metrics as M
from .code_info import M_OTHERS, code_info_counts
from .model_inputs import model_kwargs
from .quality import Quality


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device`` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, criterion, cfg, dist, W: int, zero_codes, autocast,
             progress: bool = False) -> tuple[dict, dict]:
    """``val/*_epoch`` scalars and code-usage histograms of one pass over ``loader`` (a
    progress bar on stderr with ``progress``).

    Every figure (loss, CE, accuracies, code information, AUC, EPE) is on ``eval_mask``;
    ``val/dynamic_point_ratio_epoch`` describes the run's own filter (``mask``).
    """
    model.eval()
    q, codes = Quality(W), []
    loss_sum = ce_sum = n_sum = kept = points = 0.0
    for batch in tqdm(loader, desc="validation", unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
        if len(batch["clip_id"]) == 0:
            continue  # an empty share of a tiny validation split under DDP
        batch = to_device(batch, dist.device)
        kw = model_kwargs(batch)
        with autocast():
            out = model(batch["velocities"], **kw)
            loss, info = criterion(out["logits"], batch["labels"], batch["eval_mask"])
        n = float(info["count"])
        loss_sum, ce_sum, n_sum = loss_sum + float(loss) * n, ce_sum + float(info["ce"]) * n, n_sum + n
        k, p = M.dynamic_point_counts(batch["mask"])
        kept, points = kept + k, points + p

        def decode(qz, kw=kw):
            with autocast():
                return model.decode(qz, **kw)

        q.add(out["logits"].float(), batch["labels"], batch["velocities"], batch["eval_mask"], decode,
              out["quantized"], out["z_bounded"])
        codes.append(out["codes"].reshape(-1))
    loss_sum, ce_sum, n_sum, kept, points = D.all_reduce_sum([loss_sum, ce_sum, n_sum, kept, points], dist.device)
    scalars = {"val/loss_epoch": M.ratio((loss_sum, n_sum)), "val/ce_epoch": M.ratio((ce_sum, n_sum)),
               **q.reduce(dist.device).scalars("val", "epoch"),
               "val/dynamic_point_ratio_epoch": M.ratio((kept, points))}
    all_codes = D.gather_codes(torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int64, device=dist.device))
    hists = {}
    if all_codes.size:
        S = len(zero_codes)
        cs, hists = M.code_scalars("val", "epoch", all_codes.reshape(-1, S), cfg.model.fsq_levels, zero_codes)
        scalars.update(cs)
    model.train()
    return scalars, hists


@torch.no_grad()
def train_code_info(model, batch: dict, quantized: torch.Tensor, device) -> float:
    """``train/code_info_bits_step``: code information of a training batch's codes on its
    ``eval_mask``, decoded in eval mode (no dropout: the training RNG stream is untouched),
    summed over ranks (collective); nan (logged as null) when every batch holds one clip.

    Only the first M + 1 clips of the batch are scored, each against the other M: the
    estimator of a batch of M + 1, at (M + 1)^2 clip decodes whatever the batch size (CPU,
    B=16, N=400, hidden 64: 1.7x a training step; all 16 clips: 2.6x).
    """
    was = model.training
    model.eval()
    try:
        r = M_OTHERS + 1
        kw = {k: v[:r] for k, v in model_kwargs(batch).items()}
        qz = quantized[:r].detach().float()
        s, n = code_info_counts(lambda z: model.decode(z, **kw), qz, batch["labels"][:r], batch["eval_mask"][:r])
    finally:
        model.train(was)
    s, n = D.all_reduce_sum([s, n], device)
    return s / n if n else float("nan")  # no clip had another's codes (batches of one): no estimate
