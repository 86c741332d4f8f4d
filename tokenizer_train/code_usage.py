"""The code-usage regulariser as the trainer uses it: config, running average, checkpoint state.

DESIGN.md (Trainer): the average code distribution is estimated over more tokens than a small
batch holds when B*S < K. :class:`RunningCodeAverage` keeps that estimate: a running mean
over the first ``avg_tokens`` tokens, then an exponential average with the same window. The
estimate's value includes the past; its gradient reaches the current batch with weight 1 (the
gradient of H at the better estimate, applied to the batch's own distribution): a mixture
weight n / (past + n) on the gradient would shrink the usage term ~30x at 4*K tokens and
leave the per-token term alone in charge, which collapses the codes onto the zero code
(measured on LIBERO). Its state goes into the checkpoint, so a resumed run continues
bit-exactly.
"""
from __future__ import annotations

import math

import torch

from .losses import code_usage_loss


class RunningCodeAverage:
    """Running estimate of the average soft code distribution over ``avg_tokens`` tokens."""

    def __init__(self, K: int, avg_tokens: int):
        self.K, self.avg_tokens = int(K), int(avg_tokens)
        self.avg = torch.zeros(self.K, dtype=torch.float32)  # detached past estimate
        self.filled = 0.0  # tokens the past estimate stands for (<= avg_tokens)

    def mix(self, p_batch: torch.Tensor, n: float) -> torch.Tensor:
        """The estimate including the batch (``n`` tokens, distribution ``p_batch``), with the
        batch's gradient at full weight (see the module note); advances the state."""
        past = min(self.filled, max(self.avg_tokens - n, 0.0))
        if past > 0:
            p = (past * self.avg.to(p_batch.device) + n * p_batch.detach()) / (past + n)
            p = p + (p_batch - p_batch.detach())  # value: the estimate; d/d p_batch: identity
        else:  # the batch alone already holds the window
            p = p_batch
        self.avg = p.detach().to("cpu", torch.float32).clone()
        self.filled = past + n
        return p

    def state_dict(self) -> dict:
        return {"avg": self.avg.clone(), "filled": self.filled, "avg_tokens": self.avg_tokens}

    def load_state_dict(self, st: dict):
        if st["avg"].shape != (self.K,):
            raise ValueError(f"checkpoint's code-usage average has {st['avg'].shape[0]} codes, the model {self.K}")
        self.avg = st["avg"].to(torch.float32).clone()
        self.filled = float(st["filled"])


def avg_tokens_for(tc, K: int) -> int:
    """``training.code_entropy_avg_tokens``; null: 4 * K (an average over more tokens than codes)."""
    return 4 * K if tc.code_entropy_avg_tokens is None else int(tc.code_entropy_avg_tokens)


class CodeUsageRegulariser:
    """``training.code_entropy_*`` bound to a model's FSQ levels: ``reg(z_bounded) -> (term, soft_norm)``."""

    def __init__(self, tc, levels, distributed: bool = False):
        self.tc, self.levels, self.distributed = tc, list(levels), distributed
        K = math.prod(self.levels)
        n = avg_tokens_for(tc, K)
        self.running = RunningCodeAverage(K, n) if n > 0 else None

    def __call__(self, z_bounded: torch.Tensor):
        return code_usage_loss(z_bounded.reshape(-1, len(self.levels)), self.levels, self.tc.code_entropy_type,
                               self.tc.code_entropy_temperature, distributed=self.distributed,
                               token_weight=self.tc.code_entropy_token_weight, running=self.running)

    def state_dict(self) -> dict:
        return {} if self.running is None else self.running.state_dict()

    def load_state_dict(self, st: dict):
        if self.running is not None and st:
            self.running.load_state_dict(st)
