"""Logit adjustment: train with class weights, keep the logits calibrated to the label prior.

``training.logit_adjustment`` (tau, default 0 = off) wraps the criterion so that the loss
sees ``logits + tau * log w`` (w: the class weights of ``training.class_weighting``).

Why: weighted cross-entropy is minimised by logits ``log p(c|x) + log w_c``, so with the
centre down-weighted the model's argmax predicts motion where the centre is more likely:
accuracy and EPE fall below the collapsed baseline's even when the codes carry real
information (the accuracy gate and centre down-weighting pull against each other). With
the offset inside the loss, the gradient -- and so everything the weighting does to the
encoder and the codes -- is exactly that of weighted CE on ``logits + tau * log w``, while
the model's own logits converge to ``log p(c|x) + (1 - tau) * log w_c``: at tau = 1 the
calibrated posterior (the logit-adjusted loss of Menon et al., 2021, with the weights in
place of the inverse prior). Everything downstream of the model -- accuracy, non-centre
accuracy, EPE, ``tokenize`` -- reads the model's logits, so it needs no change.
0 < tau < 1 keeps part of the bias towards motion classes.
"""
from __future__ import annotations

import torch
from motion_data.common.errors import SettingError


class LogitAdjusted:
    """``criterion(logits + tau * log w, labels, mask)``; other attributes pass through."""

    def __init__(self, criterion, tau: float):
        w = getattr(criterion, "class_weights", None)
        if w is None:
            raise SettingError("training.logit_adjustment needs class weights: set training.class_weighting.method "
                             "to balanced or ring_decay")
        w = torch.as_tensor(w, dtype=torch.float32)
        if (w <= 0).any():
            raise SettingError("training.logit_adjustment needs class weights > 0 (raise class_weighting.min_weight)")
        self.inner = criterion
        self.tau = float(tau)
        self.offset = self.tau * torch.log(w)
        self._dev = None

    def _offset_on(self, logits):
        if self._dev is None or self._dev.device != logits.device:
            self._dev = self.offset.to(logits.device)
        return self._dev.to(logits.dtype)

    def __call__(self, logits, labels, mask):
        return self.inner(logits + self._offset_on(logits), labels, mask)

    def fused(self, features, layer, labels, mask):
        """``__call__`` without materialising the logits (losses.Criterion.fused)."""
        return self.inner.fused(features, layer, labels, mask, offset=self._offset_f32(features))

    def _offset_f32(self, x):
        """The offset in float32 on ``x``'s device, copied there once (no copy, no sync per step)."""
        if getattr(self, "_dev32", None) is None or self._dev32.device != x.device:
            self._dev32 = self.offset.to(x.device, torch.float32)
        return self._dev32

    def __getattr__(self, name):
        return getattr(self.inner, name)


def wrap(criterion, training_cfg):
    """The criterion the trainer uses: itself, or logit-adjusted when tau != 0."""
    tau = float(training_cfg.logit_adjustment)
    return criterion if tau == 0.0 else LogitAdjusted(criterion, tau)
