"""The validation figures of one pass on the evaluation mask (docs/DESIGN.md, Trainer): accuracy,
non-centre accuracy, CE and code information in bits per label, AUC moving vs static, EPE
next to the zero predictor's. Exact (sum, count) sums and the AUC histogram, so batches,
epochs and DDP ranks aggregate before dividing."""
from __future__ import annotations

import numpy as np

from motion_data.common.labels import center_class

from tokenizer_train.evaluate import auc as A
from tokenizer_train.evaluate import code_info as CI
from tokenizer_train.common import distributed as D
from tokenizer_train.evaluate import metrics as M

KEYS = ("correct", "count", "nc_correct", "nc_count", "ce_bits", "info_bits", "info_count", "epe", "epe_zero",
        "near_boundary", "channels")


class Quality:
    """Accumulates ``add`` over batches; ``scalars`` divides (after ``reduce`` under DDP)."""

    def __init__(self, W: int):
        self.W, self.center = W, center_class(W)
        self.v = dict.fromkeys(KEYS, 0.0)
        self.hist = np.zeros((2, A.NBINS), np.int64)

    def add(self, logits, labels, velocities, mask, info=None, z_bounded=None):
        """One batch: ``mask`` is its ``eval_mask``; ``info``: its code information as
        ``code_info.code_info_counts``' (sum, count); ``z_bounded`` (FSQ's pre-rounding
        values) the share of channel values near a rounding boundary."""
        m = mask.bool()
        pred = logits.argmax(-1)
        v = self.v
        c, n = M.accuracy_counts(pred, labels, m)
        nc, nn = M.noncenter_counts(pred, labels, m, self.center)
        ce, _ = CI.ce_bits_counts(logits, labels, m)
        epe, _ = M.epe_px_counts(logits, velocities, m, self.W)
        ez, _ = M.epe_zero_px_counts(velocities, m, self.W)
        for k, x in zip(("correct", "count", "nc_correct", "nc_count", "ce_bits", "epe", "epe_zero"),
                        (c, n, nc, nn, ce, epe, ez)):
            v[k] += float(x)
        if info is not None:
            s, k = info
            v["info_bits"] += s
            v["info_count"] += k
        if z_bounded is not None:
            near, total = M.boundary_counts(z_bounded)
            v["near_boundary"] += near
            v["channels"] += total
        self.hist += A.auc_hist(logits, labels, m, self.center)

    def reduce(self, device) -> "Quality":
        """Sums over all ranks (collective; identity without DDP)."""
        flat = D.all_reduce_sum([self.v[k] for k in KEYS] + self.hist.reshape(-1).tolist(), device)
        out = Quality(self.W)
        out.v = dict(zip(KEYS, flat[:len(KEYS)]))
        out.hist = np.rint(np.asarray(flat[len(KEYS):])).astype(np.int64).reshape(2, A.NBINS)
        return out

    def scalars(self, prefix: str, when: str) -> dict:
        v = self.v
        info = v["info_bits"] / v["info_count"] if v["info_count"] else float("nan")  # no batch of >= 2 clips
        return {f"{prefix}/code_info_bits_{when}": info,
                f"{prefix}/ce_bits_{when}": M.ratio((v["ce_bits"], v["count"])),
                f"{prefix}/auc_moving_{when}": A.auc_from_hist(self.hist),
                f"{prefix}/acc_{when}": M.ratio((v["correct"], v["count"])),
                f"{prefix}/acc_noncenter_{when}": M.ratio((v["nc_correct"], v["nc_count"])),
                f"{prefix}/epe_px_{when}": M.ratio((v["epe"], v["count"])),
                f"{prefix}/epe_zero_px_{when}": M.ratio((v["epe_zero"], v["count"])),
                f"{prefix}/fsq_boundary_share_{when}": M.ratio((v["near_boundary"], v["channels"]))}
