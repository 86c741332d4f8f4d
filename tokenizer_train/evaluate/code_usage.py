"""The code-usage regulariser (stage 1): the differentiable term, and the trainer's config,
running average and checkpoint state.

The term replaces the original plan's entropy of a histogram of hard FSQ ids, which has no gradient:
each FSQ channel's bounded value before rounding is softly assigned to the levels that
rounding picks from, so the batch's code distribution, and its entropy, are differentiable.

docs/DESIGN.md (Trainer): the average code distribution is estimated over more tokens than a small
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

from tokenizer_train.model.fsq_geometry import levels_grid_on
from motion_data.common.errors import SettingError


def _soft_assign(z_bounded, levels, temperature):
    """Per channel ``(M, L_c)`` softmax(-(z - level)^2 / temperature) in float32."""
    z = z_bounded.float()
    out = []
    for c, grid in enumerate(levels_grid_on(levels, z.device)):
        d2 = (z[:, c:c + 1] - grid) ** 2
        out.append(torch.softmax(-d2 / temperature, dim=-1))
    return out


def _outer_rows(qs):
    """Row-wise Kronecker product of ``[(M, L_0), (M, L_1), ...]`` with channel 0 fastest."""
    joint = qs[-1]
    for q in reversed(qs[:-1]):
        joint = (joint[:, :, None] * q[:, None, :]).reshape(joint.shape[0], -1)
    return joint


def _entropy(p):
    return -(p * torch.log(p.clamp_min(1e-30))).sum()


def _dist_ready(distributed: bool) -> bool:
    return distributed and torch.distributed.is_available() and torch.distributed.is_initialized()


def soft_code_distribution(z_bounded, levels, temperature: float, distributed: bool = False,
                           return_count: bool = False):
    """The batch's soft joint code distribution ``(K,)`` in FSQ index order (sums to 1).

    ``p[k] = mean over tokens of prod_c q_c[token, level_c(k)]``. Computed as one matmul of
    two row-wise Kronecker products (channel groups A and B), so the memory is
    ``M * (K_A + K_B)`` floats rather than ``M * K``. Under DDP the sums and token counts
    are all-reduced (with gradient) before normalising. ``return_count``: also return the
    (global) token count as a float tensor.
    """
    qs = _soft_assign(z_bounded, levels, temperature)
    sizes = [int(L) for L in levels]
    # split the channels where the two groups' code counts are most balanced
    split = min(range(1, len(sizes) + 1),
                key=lambda a: math.prod(sizes[:a]) + (math.prod(sizes[a:]) if a < len(sizes) else 0))
    qa = _outer_rows(qs[:split])
    if split < len(sizes):
        qb = _outer_rows(qs[split:])
        P = (qb.transpose(0, 1) @ qa).reshape(-1)  # index = i_B * K_A + i_A: channel 0 fastest
    else:
        P = qa.sum(0)
    n = torch.tensor(float(z_bounded.shape[0]), device=P.device)
    if _dist_ready(distributed):
        from tokenizer_train.common.distributed import all_reduce_with_grad

        P = all_reduce_with_grad(P)
        torch.distributed.all_reduce(n)
    P = P / n.clamp_min(1.0)
    return (P, n) if return_count else P


def token_code_entropy(z_bounded, levels, temperature: float):
    """``(M,)`` entropy in nats of each token's own soft code assignment.

    A token's joint assignment is the product of its channels' assignments, so its entropy
    is exactly the sum of the channel entropies (no K-sized tensor is needed).
    """
    qs = _soft_assign(z_bounded, levels, temperature)
    return sum(-(q * torch.log(q.clamp_min(1e-30))).sum(-1) for q in qs)


# the joint distribution is a K-vector plus M * (K_A + K_B) factors; beyond this it is refused
MAX_EXACT_CODES = 1 << 24


def code_usage_loss(z_bounded, levels, kind: str = "entropy", temperature: float = 0.1,
                    distributed: bool = False, token_weight: float = 0.0, running=None):
    """Differentiable code-usage term from FSQ's bounded pre-rounding values (docs/DESIGN.md Trainer).

    ``z_bounded`` (M, d): :func:`fsq_prerounding` of the FSQ input, one row per token.
    Returns ``(loss_term, soft_entropy_norm)``; the caller adds ``λ * loss_term`` to CE.
    LFQ / MAGVIT-v2 form: the entropy H(p) of the average soft code distribution goes up
    and, with ``token_weight`` > 0, each token's own assignment entropy goes down (so usage
    is not spread by ambiguous tokens that straddle rounding boundaries):
    ``kind="entropy"``: ``(-H(p) + token_weight * mean_token_H) / log K``;
    ``"kl_uniform"``: ``KL(p || U) + token_weight * mean_token_H = log K - H(p) + ...`` (nats).
    ``running``: a :class:`tokenizer_train.evaluate.code_usage.RunningCodeAverage`; ``p`` is then its
    estimate over more tokens than the batch (the batch's share keeps its gradient), and the
    running state is advanced. ``p`` is always the exact joint distribution; codebooks
    above :data:`MAX_EXACT_CODES` are refused. ``soft_entropy_norm`` = H(p) / log K, detached
    (log it as ``train/code_entropy_soft_step``).
    """
    if kind not in ("entropy", "kl_uniform"):
        raise ValueError(f"code_entropy_type must be 'entropy' or 'kl_uniform', got {kind!r}")
    if z_bounded.ndim != 2 or z_bounded.shape[1] != len(levels):
        raise ValueError(f"z_bounded must be (M, {len(levels)}), got {tuple(z_bounded.shape)}")
    K = math.prod(int(L) for L in levels)
    if K > MAX_EXACT_CODES:
        raise SettingError(f"model.fsq_levels {list(levels)} give K={K} codes, more than the regulariser's exact "
                         f"joint distribution supports ({MAX_EXACT_CODES}); use fewer or smaller levels, or "
                         f"set training.code_entropy_weight=0")
    # float32 throughout: under autocast the matmul would otherwise run in bf16/fp16 and
    # the small probabilities of a 2000-code distribution lose their digits
    with torch.autocast(device_type=z_bounded.device.type, enabled=False):
        return _code_usage_loss_f32(z_bounded.float(), levels, kind, temperature, distributed, token_weight,
                                    running, K)


def _code_usage_loss_f32(z_bounded, levels, kind, temperature, distributed, token_weight, running, K):
    log_k = math.log(K)
    p, n = soft_code_distribution(z_bounded, levels, temperature, distributed, return_count=True)
    if running is not None:
        # the token count as a host number: the batch's own without DDP (no device sync);
        # under DDP the all-reduced count is read (one sync)
        p = running.mix(p, float(n) if _dist_ready(distributed) else float(z_bounded.shape[0]))
    H = _entropy(p)
    term = -H / log_k if kind == "entropy" else log_k - H
    if token_weight:
        own = token_code_entropy(z_bounded, levels, temperature).sum()
        if _dist_ready(distributed):
            from tokenizer_train.common.distributed import all_reduce_with_grad

            own = all_reduce_with_grad(own)
        own = own / n.clamp_min(1.0)
        term = term + token_weight * (own / log_k if kind == "entropy" else own)
    return term, (H / log_k).detach()


def entropy_weight(weight: float, warmup_epochs: float, epoch_float: float) -> float:
    """λ at a (fractional) epoch: linear from 0 at epoch 0 to ``weight`` at ``warmup_epochs``."""
    if weight == 0.0 or warmup_epochs <= 0:
        return float(weight)
    return float(weight) * min(max(epoch_float / warmup_epochs, 0.0), 1.0)


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
        self.avg = p.detach().to(torch.float32).clone()  # stays on the device: no sync per step
        self.filled = past + n
        return p

    def state_dict(self) -> dict:
        return {"avg": self.avg.cpu().clone(), "filled": self.filled, "avg_tokens": self.avg_tokens}

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
