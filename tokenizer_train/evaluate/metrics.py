"""Stage-0 observability: code statistics and prediction quality, as pure functions.

Code statistics take hard FSQ indices (numpy ints, any shape) and are logged, never used
as a loss. Quality metrics take torch tensors and return ``(sum, count)`` pairs so that
steps, epochs and ranks can be aggregated exactly before dividing.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from motion_data.common.labels import center_class, class_offsets, half_window

from tokenizer_train.model.model_inputs import take


# ------------------------------------------------------------------ code statistics
def code_counts(codes, codebook_size: int) -> np.ndarray:
    """``(K,)`` int64 usage count of every code id."""
    c = np.asarray(codes).reshape(-1).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= codebook_size):
        raise ValueError(f"code ids must lie in [0, {codebook_size}), got [{c.min()}, {c.max()}]")
    return np.bincount(c, minlength=codebook_size)


def entropy(counts) -> float:
    """Entropy in nats of the distribution given by counts (0 for no counts)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum())


def level_indices(codes, levels: list[int]) -> np.ndarray:
    """``(..., d)`` per-channel level index of each code id (FSQ's mixed-radix order)."""
    basis = np.cumprod([1] + list(levels[:-1])).astype(np.int64)
    c = np.asarray(codes, dtype=np.int64)[..., None]
    return (c // basis) % np.asarray(levels, dtype=np.int64)


def unique_raw_levels(codes, levels: list[int]) -> int:
    """Distinct levels used per FSQ channel, summed over channels."""
    li = level_indices(np.asarray(codes).reshape(-1), levels)
    return int(sum(len(np.unique(li[:, j])) for j in range(len(levels))))


def code_stats(codes, levels: list[int]) -> dict:
    """unique_codes, unique_codes_raw, entropy (nats), entropy_norm (H / log K), perplexity."""
    K = math.prod(levels)
    counts = code_counts(codes, K)
    H = entropy(counts)
    return {
        "unique_codes": int((counts > 0).sum()),
        "unique_codes_raw": unique_raw_levels(codes, levels),
        "entropy": H,
        "entropy_norm": H / math.log(K),
        "perplexity": math.exp(H),
        "counts": counts,
    }


def update_seen(seen: np.ndarray, codes) -> int:
    """Mark codes as seen (``seen`` is a ``(K,)`` bool array, updated in place); return
    the number of distinct codes seen so far (not the largest id)."""
    seen[np.asarray(codes, dtype=np.int64).reshape(-1)] = True
    return int(seen.sum())


def zero_code_frac(codes, zero_codes) -> float:
    """Share of tokens ``(..., S)`` whose id equals the zero-motion code of their step ``(S,)``."""
    c = np.asarray(codes)
    if c.size == 0:
        return 0.0
    return float((c == np.asarray(zero_codes)).mean())


def code_scalars(prefix: str, when: str, codes: np.ndarray, levels, zero_codes=None, seen=None,
                 tag_suffix: str = "") -> tuple[dict, dict]:
    """The original plan's code statistics of a set of code ids ``(tokens, S)``, e.g.
    ``train/unique_codes_step`` (``when="step"``) or ``..._step_global`` (``tag_suffix="_global"``)."""
    s = code_stats(codes, levels)
    out = {f"{prefix}/unique_codes_{when}{tag_suffix}": s["unique_codes"],
           f"{prefix}/unique_codes_raw_{when}{tag_suffix}": s["unique_codes_raw"],
           f"{prefix}/entropy_{when}{tag_suffix}": s["entropy"],
           f"{prefix}/entropy_norm_{when}{tag_suffix}": s["entropy_norm"],
           f"{prefix}/perplexity_{when}{tag_suffix}": s["perplexity"]}
    if zero_codes is not None:
        out[f"{prefix}/zero_code_frac_{when}{tag_suffix}"] = zero_code_frac(codes, zero_codes)
    if seen is not None:
        out[f"{prefix}/effective_codebook_size_seen{tag_suffix}"] = int(seen.sum())
    return out, {f"{prefix}/code_usage_hist{tag_suffix}": s["counts"]}


# ------------------------------------------------------------------ prediction quality
def accuracy_sums(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, count) of predicted class ids over the mask as 0-dim tensors on the
    batch's device (no host sync: the trainer sums them and reads them at the log interval)."""
    m = mask.bool()
    return ((pred == labels) & m).sum(), m.sum()


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(correct, count) of argmax predictions over the mask; ``logits`` may also be the
    predicted class ids already (same shape as labels), to take the argmax once."""
    pred = logits.argmax(-1) if logits.dim() == labels.dim() + 1 else logits
    c, n = accuracy_sums(pred, labels, mask)
    return float(c), int(n)


def noncenter_counts(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, center: int) -> tuple[float, int]:
    """(correct, count) over kept points whose label is not the centre class."""
    return accuracy_counts(logits, labels, mask.bool() & (labels != center))


def expected_displacement_px(logits: torch.Tensor, W: int) -> torch.Tensor:
    """``(..., 2)`` softmax-weighted class offsets in pixels (x, y)."""
    off = torch.as_tensor(class_offsets(W), device=logits.device)
    return torch.softmax(logits.float(), dim=-1) @ off


def epe_px_counts(logits: torch.Tensor, velocities: torch.Tensor, mask: torch.Tensor, W: int) -> tuple[float, int]:
    """(sum, count) of the end-point error in px between the expected displacement and the
    true displacement (``velocities`` are normalised; px = v_norm * (W-1)/2) over the mask
    (the loss mask already implies valid)."""
    m = mask.bool()
    if not m.any():
        return 0.0, 0
    err = torch.linalg.vector_norm(expected_displacement_px(logits[m], W) - velocities[m].float() * half_window(W), dim=-1)
    return float(err.sum()), int(m.sum())


def epe_zero_px_counts(velocities: torch.Tensor, mask: torch.Tensor, W: int) -> tuple[float, int]:
    """(sum, count) of the zero predictor's end-point error in px (the true displacement's
    length) over the mask: the reference ``val/epe_px_epoch`` is read next to."""
    m = mask.bool()
    if not m.any():
        return 0.0, 0
    return float(torch.linalg.vector_norm(velocities[m].float() * half_window(W), dim=-1).sum()), int(m.sum())


BOUNDARY_MARGIN = 0.1


def boundary_counts(z_bounded: torch.Tensor, margin: float = BOUNDARY_MARGIN) -> tuple[float, int]:
    """(channel values within ``margin`` of an FSQ rounding boundary, all channel values).

    ``z_bounded`` is on FSQ's integer level grid (losses.fsq_prerounding), so the boundaries are
    the half-integers. Codes bought with ambiguity (a usage regulariser that spreads tokens
    over boundaries) show up as a high share; such codes flip under tiny input noise.
    """
    z = z_bounded.detach().float()
    dist = (z - torch.floor(z) - 0.5).abs()  # 0 at a boundary, 0.5 on a level
    return float((dist < margin).sum()), z.numel()


def dynamic_point_sums(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(kept points as a 0-dim tensor, all points) of a batch ``(B, S, N)``: a point is kept
    when any of its steps is in the loss mask (docs/DESIGN.md: dynamic_point_ratio = kept
    points / all points)."""
    B, S, N = mask.shape
    return mask.bool().any(dim=1).sum(), B * N


def dynamic_point_counts(mask: torch.Tensor) -> tuple[int, int]:
    """:func:`dynamic_point_sums` as host numbers."""
    kept, points = dynamic_point_sums(mask)
    return int(kept), points


def ratio(num_den) -> float:
    num, den = num_den
    return float(num) / den if den else 0.0


# ------------------------------------------------------------------ the training loop's sums
class Sums:
    """Exact (sum, count) accumulators for a step, an epoch or a validation pass.

    Values are float64: 0-dim tensors on the batch's device while training (adding a batch
    never waits for the device), host floats once read. ``reduced`` (all ranks)
    and ``floats`` (a checkpoint) read them: call them at the log interval only.
    """

    KEYS = ("loss", "ce", "total", "count", "correct", "nc_correct", "nc_count", "epe", "epe_count",
            "kept", "points", "clips", "e_correct", "e_count")

    def __init__(self, values=None):
        self.v = dict.fromkeys(self.KEYS, 0.0) | dict(values or {})

    def add(self, **kw):
        for k, x in kw.items():
            self.v[k] = self.v[k] + x

    def floats(self) -> dict:
        """``{key: float}`` (one host sync for all keys)."""
        dev = [k for k in self.KEYS if torch.is_tensor(self.v[k])]
        got = dict(zip(dev, torch.stack([self.v[k].double() for k in dev]).tolist())) if dev else {}
        return {k: float(got.get(k, self.v[k])) for k in self.KEYS}

    def reduced(self, device) -> dict:
        from tokenizer_train.common.distributed import all_reduce_sum

        f = self.floats()
        return dict(zip(self.KEYS, all_reduce_sum([f[k] for k in self.KEYS], device)))


def batch_sums(out, batch, loss, info, total, W) -> dict:
    """A training batch's contribution to :class:`Sums`, as float64 device tensors (no sync).

    ``out["pred"]``: the predicted class of each decoded entry, at ``batch["decode_index"]``
    (every entry, flattened, when the batch has none)."""
    sel = batch.get("decode_index")
    pred, labels, mask = out["pred"], take(batch["labels"], sel), take(batch["mask"], sel)
    n = info["count"].double()
    c, m = accuracy_sums(pred, labels, mask)
    nc, nm = accuracy_sums(pred, labels, mask.bool() & (labels != center_class(W)))
    kept, pts = dynamic_point_sums(batch["mask"])
    ec, en = accuracy_sums(pred, labels, take(batch["eval_mask"], sel))  # train/acc_evalmask_epoch: check's gate
    return dict(loss=loss.double() * n, ce=info["ce"].double() * n, total=total.double() * n, count=n,
                correct=c.double(), nc_correct=nc.double(), nc_count=nm.double(), kept=kept.double(),
                points=float(pts), clips=float(batch["labels"].shape[0]), e_correct=ec.double(), e_count=en.double())


def step_scalars(r: dict) -> dict:
    """The ``train/*_step`` figures of reduced step sums."""
    return {"train/loss_step": ratio((r["loss"], r["count"])),
            # the objective's unweighted CE (nats) on the logits the loss sees (logit-adjusted when
            # training.logit_adjustment is on); the quality figure is val/ce_bits_epoch
            "train/objective_ce_step": ratio((r["ce"], r["count"])),
            "train/loss_total_step": ratio((r["total"], r["count"])),
            "train/total_loss_step": ratio((r["total"], r["count"])),
            "train/acc_step": ratio((r["correct"], r["count"])),
            "train/acc_noncenter_step": ratio((r["nc_correct"], r["nc_count"])),
            "train/dynamic_point_ratio_step": ratio((r["kept"], r["points"]))}


def epoch_scalars(r: dict) -> dict:
    """The ``train/*_epoch`` figures of reduced epoch sums."""
    return {"train/loss_epoch": ratio((r["loss"], r["count"])),
            "train/acc_epoch": ratio((r["correct"], r["count"])),
            "train/acc_evalmask_epoch": ratio((r["e_correct"], r["e_count"])),
            "train/acc_noncenter_epoch": ratio((r["nc_correct"], r["nc_count"])),
            "train/dynamic_point_ratio_epoch": ratio((r["kept"], r["points"]))}
