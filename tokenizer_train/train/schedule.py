"""Training strategy (seed stage 5): LR warm-up + cosine/step decay, gradient clipping.

``training.lr_schedule`` with the default ``type: none, warmup_steps: 0`` is a constant
factor 1.0, so the learning rate is the baseline's exactly. Steps count optimizer steps
(``scheduler.step()`` once per optimizer step, after ``optimizer.step()``).
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from motion_data.common.errors import SettingError


def lr_factor(step: int, lr_cfg, total_steps: int, base_lr: float) -> float:
    """Multiplier of ``base_lr`` at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (the first
    step already moves). Then ``none``: 1; ``cosine``: from ``base_lr`` down to ``min_lr`` at
    ``total_steps`` (and ``min_lr`` after); ``step``: ``base_lr * gamma ** (k // step_size)``
    with k the steps since warm-up, never below ``min_lr``.
    """
    warm = int(lr_cfg.warmup_steps)
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if lr_cfg.type == "none":
        return 1.0
    floor = (lr_cfg.min_lr / base_lr) if base_lr > 0 else 0.0
    k = step - warm
    if lr_cfg.type == "cosine":
        span = max(int(total_steps) - warm, 1)
        progress = min(max(k / span, 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if lr_cfg.type == "step":
        if lr_cfg.step_size < 1:
            raise SettingError(f"training.lr_schedule.step_size must be >= 1, got {lr_cfg.step_size}")
        return max(lr_cfg.gamma ** (k // int(lr_cfg.step_size)), floor)
    raise SettingError(f"training.lr_schedule.type must be none, cosine or step, got {lr_cfg.type!r}")


def build_scheduler(optimizer, lr_cfg, total_steps: int, base_lr: float) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; its state_dict resumes exactly."""
    lr_factor(0, lr_cfg, total_steps, base_lr)  # validate the config now, not at step 1
    return LambdaLR(optimizer, lambda step: lr_factor(step, lr_cfg, total_steps, base_lr))


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip the total L2 gradient norm to ``max_norm`` (off when <= 0); return the pre-clip norm.

    With a fp16 ``GradScaler`` call ``scaler.unscale_(optimizer)`` first. When off the
    gradients are not touched (the norm is still returned for logging).
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
