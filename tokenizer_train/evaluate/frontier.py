"""Accuracy vs non-centre accuracy of a trained run as the centre class's logit is shifted.

  python -m tokenizer_train frontier --run RUN --data BUILD [--offsets=-3:3:0.5] [--json F]

Tells a decision-rule problem from a model problem. Class weighting, focal loss and logit
adjustment all move the same thing at prediction time: how readily the model leaves the
centre ("no motion") class. Adding an offset b to the centre logit before the argmax
(b > 0: predict no motion more often) traces every accuracy / non-centre-accuracy trade-off
the run's logits allow, without retraining. If no offset gives non-centre accuracy while
keeping accuracy near the all-centre predictor's (what a collapsed tokenizer scores), the
model has no usable motion information on that split and no loss re-weighting of the same
model can pass both of check's validation gates; the fix has to make the model better
(more or more varied data, more steps, capacity).

Per offset: accuracy, non-centre accuracy, EPE (px, the softmax expectation as in training)
and the share of centre predictions, on the run's validation split (its val_split; every
held-out clip once) and the evaluation mask (valid AND the build's recorded filter,
docs/DESIGN.md, whatever filter the run trained with). One forward pass per batch serves
every offset. Summary: the all-centre accuracy (the split's centre share) and the best
non-centre accuracy among offsets whose accuracy is at most 0.02 (check's accuracy
tolerance) below it; and, of the unshifted model, code information and CE in bits per
label, AUC moving vs static and EPE next to the zero predictor's (the trainer's validation
figures; code information mixes each clip with the other clips of its batch, so it equals
the logged value at the run's batch size).
(CE: cross-entropy of the labels under the decoder, bits per label; AUC: area under the ROC
curve of moving vs static points scored by 1 - p(centre); EPE: end-point error of the
predicted displacement, px)
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from motion_data.inspect.analysis import threshold_range
from motion_data.common.atomic import atomic_write_json
from motion_data.common.labels import center_class, class_offsets, half_window
from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError, SettingError
from motion_data.read.loader import LoaderOptions, make_loader

from tokenizer_train.evaluate.check import ACC_TOL
from tokenizer_train.common.distributed import Dist, pick_device
from tokenizer_train.evaluate.code_info import code_info_counts
from tokenizer_train.model.model_inputs import entry_clip, model_kwargs, take, with_index
from tokenizer_train.evaluate.quality import Quality
from tokenizer_train.evaluate.validate import clip_places, code_pool, decoder_at, to_device
from tokenizer_train.model.checkpoint import load_model

DEFAULT_OFFSETS = threshold_range(-3.0, 3.0, 0.5)  # centre-logit offsets


def add_arguments(p):
    p.add_argument("--run", required=True, help="training run folder (holds best.pt / last.pt)")
    p.add_argument("--data", required=True, help="build folder the run was trained on")
    p.add_argument("--checkpoint", choices=("best", "last"), default="last",
                   help="which checkpoint; last is what check's validation gates read (default: last)")
    p.add_argument("--offsets", default="-3:3:0.5",
                   help="centre-logit offsets as start:stop:step (stop inclusive) or a comma list; "
                        "0 is always included; write a negative start as --offsets=-3:3:0.5 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="clips per forward pass (default: 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model")
    p.add_argument("--json", help="also write the table and summary to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on stderr)")


def parse_offsets(spec: str) -> list[float]:
    """Offsets as ``start:stop:step`` (stop inclusive) or a comma list; negative values allowed."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            return threshold_range(start, stop, step)
        vals = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise SettingError(f"--offsets: offset range {spec!r} must look like -3:3:0.5 or -1,0,1 ({e})") from None
    if not vals:
        raise SettingError(f"--offsets {spec!r}: no offsets; give e.g. -1,0,1")
    return [round(v, 10) for v in vals]  # as threshold_range rounds


def sweep_sums(logits: torch.Tensor, labels: torch.Tensor, velocities: torch.Tensor, mask: torch.Tensor,
               offsets, W: int) -> torch.Tensor:
    """``(len(offsets), 5)`` float64 sums of one batch on its device (no host sync): correct,
    non-centre correct, EPE px sum, centre predictions, and the mask count in the last column.

    The same as adding each offset b to the centre logit and scoring argmax and softmax anew,
    from one argmax and one softmax: the shifted argmax is the centre when its shifted logit
    beats the best other logit (on a tie the lower class index wins, as in argmax), else that
    other class; the shifted softmax rescales the centre probability p_c by e^b, so the
    expected displacement is (E + p_c (e^b - 1) o_c) / (1 + p_c (e^b - 1)), o_c the centre's offset.
    """
    c = center_class(W)
    m = mask.bool()
    z, lab = logits[m].float(), labels[m]
    true_px = velocities[m].float() * half_window(W)
    zc = z[:, c]
    others = z.clone()
    others[:, c] = -torch.inf
    best, arg = others.max(-1)  # first index of the max, as argmax
    p = torch.softmax(z, dim=-1)
    off = torch.as_tensor(class_offsets(W), device=z.device)
    expected, pc, oc = (p @ off).double(), p[:, c].double(), off[c].double()
    moving = lab != c
    other_ok, centre_ok = arg == lab, ~moving
    out = torch.zeros((len(offsets), 5), dtype=torch.float64, device=z.device)
    out[:, 4] = m.sum()
    for i, b in enumerate(offsets):
        shifted = zc + b  # float32, as the shifted logit itself
        centre = (shifted > best) | ((shifted == best) & (arg > c))
        correct = torch.where(centre, centre_ok, other_ok)
        out[i, 0] = correct.sum()
        out[i, 1] = (correct & moving).sum()
        g = pc * math.expm1(b)
        disp = (expected + g[:, None] * oc) / (1 + g)[:, None]
        out[i, 2] = torch.linalg.vector_norm(disp - true_px.double(), dim=-1).sum()
        out[i, 3] = centre.sum()
    return out


def table_from_counts(offsets, sums: np.ndarray, n_noncenter: float) -> list[dict]:
    n = sums[:, 4]
    den = np.maximum(n, 1)
    return [{"offset": float(b), "acc": sums[i, 0] / den[i],
             "acc_noncenter": sums[i, 1] / max(n_noncenter, 1), "epe_px": sums[i, 2] / den[i],
             "centre_pred_share": sums[i, 3] / den[i]} for i, b in enumerate(offsets)]


def summarize(table: list[dict], centre_share: float, tol: float = ACC_TOL) -> dict:
    """The all-centre accuracy and the best non-centre accuracy within ``tol`` of it."""
    ok = [r for r in table if r["acc"] >= centre_share - tol]
    best = max(ok, key=lambda r: (r["acc_noncenter"], r["acc"]), default=None)
    return {"all_centre_acc": centre_share, "acc_tolerance": tol,
            "best_noncenter_within_tol": best["acc_noncenter"] if best else None,
            "best_offset": best["offset"] if best else None}

def check_inputs(run_dir, data_dir, which: str) -> BuildDir:
    """The build of ``data_dir``, once RUN/<which>.pt and the build folder are known to exist
    (each a one-line error naming the path and what to pass instead)."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if not (run_dir / f"{which}.pt").is_file():
        what = "no such folder" if not run_dir.exists() else f"no {which}.pt in it"
        raise DataError(f"{run_dir}: {what}; pass --run the --out folder of python -m tokenizer_train train"
                            f" (it holds {which}.pt)")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such build folder; pass --data the build the run was trained on "
                            f"(the --out of python -m preprocess build-shards)")
    return BuildDir(data_dir)


@torch.no_grad()
def frontier(run_dir, data_dir, offsets, which="last", batch_size=64, device="cpu", progress=True) -> dict:
    """Sweep ``offsets`` over every clip of the run's validation split (each scored once):
    one forward per batch; every offset's sums come from that forward's logits."""
    split = "val"
    offsets = sorted(set(float(b) for b in offsets) | {0.0})
    build = check_inputs(run_dir, data_dir, which)
    device = torch.device(device)
    model, cfg, meta = load_model(run_dir, which, device)
    W = meta["W"]
    build.check_compatible(W=meta["W"], N=meta["N"], what=f"the run {run_dir}")
    loader = make_loader(data_dir, LoaderOptions(batch_size=batch_size, seed=cfg.training.seed), split=split,
                         static_filter=cfg.data.static_filter, val_split=cfg.data.val_split)
    loader.set_epoch(0)
    pool, row, others = code_pool(model, loader, clip_places(build), Dist(device=device), contextlib.nullcontext)
    loader.set_epoch(0)
    sums = torch.zeros((len(offsets), 5), dtype=torch.float64, device=device)
    n_nc = torch.zeros((), dtype=torch.float64, device=device)
    quality = Quality(W)
    for b in tqdm(loader, desc=f"frontier ({split})", unit="batch", disable=not progress, dynamic_ncols=True,
                  leave=False):
        b = to_device(with_index(b, "eval_index", "eval_mask"), device)
        sel, kw = b["eval_index"], model_kwargs(b)  # the evaluation mask's entries only
        lab, m, vel = take(b["labels"], sel), take(b["eval_mask"], sel), take(b["velocities"], sel)
        out = model.encode(b["velocities"], **kw)
        decode = decoder_at(model, kw, sel)
        logits = decode(out["quantized"]).float()
        sums += sweep_sums(logits, lab, vel, m, offsets, W)
        info = code_info_counts(decode, out["quantized"], pool, others[[row[c] for c in b["clip_id"]]], lab, m,
                                entry_clip(sel, b["labels"].shape).to(lab.device), own_logits=logits)
        quality.add(logits, lab, vel, m, info, out["z_bounded"])
        n_nc += (m & (lab != center_class(W))).sum()
    sums, n_nc = sums.cpu().numpy(), float(n_nc)  # the one host read of the sweep
    n = sums[0, 4]
    if n == 0:
        raise DataError(f"{data_dir}: the {split} split has no labelled (kept, valid) point steps; "
                            f"train with data.val_split > 0 on a build with more clips")
    table = table_from_counts(offsets, sums, n_nc)
    # at an offset that predicts the centre everywhere the accuracy is the centre share; from the counts:
    summary = summarize(table, (n - n_nc) / n)
    summary.update({k.split("/")[1].removesuffix("_epoch"): v for k, v in quality.scalars("val", "epoch").items()
                    if k.split("/")[1] in ("code_info_bits_epoch", "ce_bits_epoch", "auc_moving_epoch",
                                           "epe_zero_px_epoch", "fsq_boundary_share_epoch")})
    return {"run": str(run_dir), "data": str(data_dir), "split": split, "checkpoint": which,
            "mask": f"evaluation mask (valid AND build filter {build.build_filter})",
            "labels": int(n), "table": table, "summary": summary}


def cached_frontier(run_dir, data_dir, device="cpu", progress=False) -> dict:
    """``frontier`` of RUN's last.pt at the default offsets, kept in RUN/frontier.json and
    recomputed only when last.pt is newer (ablate and the demo share one pass per run)."""
    run_dir = Path(run_dir)
    cache, ckpt = run_dir / "frontier.json", run_dir / "last.pt"
    if cache.exists() and cache.stat().st_mtime >= ckpt.stat().st_mtime:
        return json.loads(cache.read_text())
    res = frontier(run_dir, data_dir, DEFAULT_OFFSETS, device=device, progress=progress)
    atomic_write_json(cache, res)
    return res


def format_result(res: dict) -> str:
    lines = [f"{res['run']} ({res['checkpoint']}.pt) on the {res['split']} split of {res['data']}: "
             f"{res['labels']} labelled point steps" + (f", {res['mask']}" if "mask" in res else ""),
             f"{'offset':>7} {'acc':>7} {'noncentre':>10} {'epe_px':>7} {'centre_pred':>12}"]
    for r in res["table"]:
        lines.append(f"{r['offset']:+7.2f} {r['acc']:7.3f} {r['acc_noncenter']:10.3f} {r['epe_px']:7.3f} "
                     f"{r['centre_pred_share']:12.3f}")
    s = res["summary"]
    best = ("none" if s["best_noncenter_within_tol"] is None else
            f"{s['best_noncenter_within_tol']:.3f} (offset {s['best_offset']:+.2f})")
    if "code_info_bits" in s:  # caches written before these figures lack them
        lines.append(f"code information {s['code_info_bits']:.3f} bits/label; CE {s['ce_bits']:.3f} bits/label; "
                     f"AUC moving vs static {s['auc_moving']:.3f}; EPE of zero motion {s['epe_zero_px']:.3f} px")
    if "fsq_boundary_share" in s:
        lines.append(f"FSQ channel values within 0.1 of a rounding boundary: {s['fsq_boundary_share']:.3f}")
    lines.append(f"all-centre accuracy {s['all_centre_acc']:.3f}; best non-centre accuracy with accuracy "
                 f">= {s['all_centre_acc'] - s['acc_tolerance']:.3f}: {best}")
    return "\n".join(lines)


def run(args) -> int:
    res = frontier(args.run, args.data, parse_offsets(args.offsets), args.checkpoint, args.batch_size,
                   pick_device(args.device), progress=not args.no_progress)
    print(format_result(res))
    if args.json:
        atomic_write_json(args.json, res)
    return 0
