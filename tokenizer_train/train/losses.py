"""The training criterion: masked CE with class weighting / focal loss (stages 1-2).

Every switch defaults to off; with ``class_weighting.method: none`` and ``focal.enabled:
false`` the criterion is the masked mean cross-entropy, bit for bit. The class weights come
from :mod:`tokenizer_train.train.class_weights`, the code-usage term from
:mod:`tokenizer_train.evaluate.code_usage`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer_train.train.class_weights import class_weights_for
from tokenizer_train.train.fused_ce import IGNORE, linear_ce
from motion_data.common.errors import SettingError



def focal_alpha(training_cfg) -> float | None:
    """The loss scale of ``training.focal.alpha``: a number, or None (off, or ``per_class``:
    the class weights, which need a ``class_weighting.method``)."""
    focal = training_cfg.focal
    alpha = focal.alpha if focal.enabled else None
    if alpha == "per_class" and training_cfg.class_weighting.method == "none":
        raise SettingError("training.focal.alpha 'per_class' needs training.class_weighting.method "
                           "balanced or ring_decay (the per-class alphas are the class weights)")
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None


def masked_target(labels, mask):
    """Flat labels with ``IGNORE`` where ``mask`` is false, and the flat mask."""
    m = mask.reshape(-1)
    return labels.reshape(-1).masked_fill(~m, IGNORE), m


def weighted_loss(ce, target, count, gamma: float, weights=None, alpha: float | None = None):
    """``(loss, info)`` from the per-entry CE (0 where ``target`` is ``IGNORE``): the sum of
    ``alpha * w[y] * (1 - p_y) ** gamma * ce`` over ``count`` (each factor 1 when off)."""
    denom = count.clamp_min(1).to(torch.float32)
    per = ce
    if gamma != 0.0:
        # 1 - p = -expm1(-ce) is exact near p = 1; the floor keeps (.)**gamma finite in
        # the backward pass for gamma < 1 (ignored entries have p = 1 exactly)
        per = (-torch.expm1(-ce)).clamp_min(1e-12).pow(gamma) * per
    if weights is not None:
        per = per * weights[target.clamp_min(0)]
    if alpha is not None:
        per = per * alpha
    loss = per.sum() / denom
    return loss, {"ce": ce.detach().sum() / denom, "count": count.detach()}


class Criterion:
    """Masked CE with optional class weights and focal loss: ``criterion(logits, labels, mask)``.

    ``logits`` (B, S, N, K), ``labels`` (B, S, N) int64, ``mask`` (B, S, N) bool. Returns
    ``(loss, info)``: the loss is the mean over masked entries of
    ``alpha * w[y] * (1 - p_y) ** gamma * -log p_y`` (each factor 1 when its switch is off),
    divided by the number of masked entries (not by the weight sum, so that, weights having
    mean 1 under the labels, the loss stays on the scale of CE). An empty mask gives a zero
    loss that still back-propagates. ``info``: ``ce`` (unweighted masked CE, detached) and
    ``count`` (masked entries).

    ``focal.alpha``: a number scales the loss; ``per_class`` means the class weights (which
    are applied once, whether asked for through ``class_weighting`` or through ``alpha``),
    so it needs a ``class_weighting.method``.
    """

    def __init__(self, training_cfg, class_counts=None, W: int = 15):
        self.W = W
        self.num_classes = W * W
        self.cw_cfg = training_cfg.class_weighting
        self.focal_cfg = training_cfg.focal
        self.alpha = focal_alpha(training_cfg)
        self.gamma = float(self.focal_cfg.gamma) if self.focal_cfg.enabled else 0.0
        self._counts = None if class_counts is None else np.asarray(class_counts, np.int64).copy()
        w = class_weights_for(self.cw_cfg, self._counts, self.W)
        self.class_weights = None if w is None else torch.from_numpy(w)
        self._weights_dev = None

    @property
    def class_counts(self):
        return self._counts

    @property
    def needs_counts(self) -> bool:
        """True while the configured weighting still waits for class counts."""
        return self.cw_cfg.method == "balanced" and self.class_weights is None

    def _weights_on(self, device):
        if self.class_weights is None:
            return None
        if self._weights_dev is None or self._weights_dev.device != device:
            self._weights_dev = self.class_weights.to(device)
        return self._weights_dev

    def _check(self, K):
        if K != self.num_classes:
            raise ValueError(f"logits have {K} classes, expected W*W={self.num_classes}")
        if self.needs_counts:
            raise RuntimeError("class_weighting.method balanced has no class counts: pass class_counts "
                               "(BuildDir.class_counts of the build under the run's filter)")

    def __call__(self, logits, labels, mask):
        K = logits.shape[-1]
        self._check(K)
        flat = logits.reshape(-1, K)
        target, m = masked_target(labels, mask)
        count = m.sum()
        if self.gamma == 0.0 and self.class_weights is None and self.alpha is None:
            # the baseline: bitwise F.cross_entropy(..., ignore_index) mean, but 0 (with a
            # gradient) instead of NaN for an empty mask
            loss = F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum") / count.clamp_min(1).float()
            return loss, {"ce": loss.detach(), "count": count.detach()}
        return self.from_ce(F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="none"), target, count)

    def fused(self, features, layer, labels, mask, offset=None):
        """The loss of ``layer(features) + offset`` without materialising those logits
        (fused_ce): ``features (P, H)`` of the decoded entries, ``labels``/``mask`` ``(P,)``.
        Returns ``(loss, info, pred)``, ``pred`` the argmax of ``layer(features)``."""
        self._check(layer.out_features)
        target, m = masked_target(labels, mask)
        ce, pred = linear_ce(features, layer, target, offset)
        loss, info = self.from_ce(ce, target, m.sum())
        return loss, info, pred

    def from_ce(self, ce, target, count):
        """``(loss, info)`` from the per-entry CE (0 where ``target`` is ``IGNORE``)."""
        return weighted_loss(ce, target, count, self.gamma, self._weights_on(ce.device), self.alpha)
