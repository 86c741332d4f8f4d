"""Quantiser-input shaping (seed stage 3): optional norm, tanh stretch and noise before FSQ.

Applied to the encoder output ``(B, S, d)`` right before FSQ, in this order:
``model.quant_input_norm`` (none | layernorm | rmsnorm over the last dim), the bounded
stretch ``y = tanh(s * x)`` of ``model.quant_input_tanh_scale`` (``s`` clamped to
[s_min, s_max], learnable unless ``trainable: false``), and Gaussian noise of
``model.quant_input_noise_std`` in training mode only. With everything off the module
returns its input object unchanged (the baseline, bit for bit).

Note: FSQ bounds its input with its own ``tanh(z + shift)``; after ``tanh(s * x)`` the input
lies in (-1, 1), so the outermost levels of channels with many levels are no longer
reachable (e.g. with L = 8 rounding reaches -3..2 of -4..3). That is the original plan's definition;
watch ``train/unique_codes_raw_step`` when enabling it.
"""
from __future__ import annotations

import torch
from torch import nn


class QuantInputShaping(nn.Module):
    def __init__(self, dim: int, norm: str = "none", tanh_cfg=None, noise_std: float = 0.0):
        super().__init__()
        if norm == "none":
            self.norm = None
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(dim)
        elif norm == "rmsnorm":
            self.norm = nn.RMSNorm(dim)
        else:
            raise ValueError(f"model.quant_input_norm must be none, layernorm or rmsnorm, got {norm!r}")
        self.tanh_enabled = bool(tanh_cfg is not None and tanh_cfg.enabled)
        if self.tanh_enabled:
            self.s_min, self.s_max = float(tanh_cfg.s_min), float(tanh_cfg.s_max)
            if not 0 < self.s_min <= self.s_max:
                raise ValueError(f"quant_input_tanh_scale needs 0 < s_min <= s_max, got {self.s_min}, {self.s_max}")
            init = torch.tensor(float(tanh_cfg.init))
            if tanh_cfg.trainable:
                self.scale = nn.Parameter(init)
            else:
                self.register_buffer("scale", init)
        else:
            self.scale = None
        if noise_std < 0:
            raise ValueError(f"model.quant_input_noise_std must be >= 0, got {noise_std}")
        self.noise_std = float(noise_std)

    @property
    def is_identity(self) -> bool:
        return self.norm is None and not self.tanh_enabled and self.noise_std == 0.0

    def clamped_scale(self):
        return self.scale.clamp(self.s_min, self.s_max)

    def scale_value(self) -> float | None:
        """The tanh scale in use (after clamping), or None when the stretch is off."""
        return float(self.clamped_scale().detach()) if self.tanh_enabled else None

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        if self.tanh_enabled:
            x = torch.tanh(self.clamped_scale().to(x.dtype) * x)
        if self.noise_std > 0 and self.training:
            x = x + torch.randn_like(x) * self.noise_std
        return x

    def extra_repr(self) -> str:
        parts = [f"norm={type(self.norm).__name__ if self.norm is not None else 'none'}"]
        if self.tanh_enabled:
            parts.append(f"tanh_scale=[{self.s_min}, {self.s_max}]")
        parts.append(f"noise_std={self.noise_std}")
        return ", ".join(parts)
