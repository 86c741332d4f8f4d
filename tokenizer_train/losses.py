"""Training losses: masked CE with class weighting / focal loss, and the code-usage regulariser.

Every switch defaults to off; with ``class_weighting.method: none`` and ``focal.enabled:
false`` the criterion is the masked mean cross-entropy, bit for bit.

Class weights (``training.class_weighting``) need the label distribution under the current
static filter. Get it from the build (:func:`class_counts_from_stats`), or, when that is not
available, count it at run time: :func:`count_classes` over a loader pass before training,
or :meth:`Criterion.update_counts` batch by batch (the weights then follow the running
counts).

The code-usage regulariser (:func:`code_usage_loss`) replaces the seed's entropy of a
histogram of hard FSQ ids, which has no gradient: each FSQ channel's bounded value before
rounding is softly assigned to the levels that rounding picks from, so the batch's code
distribution, and its entropy, are differentiable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from motion_data.atomic import atomic_open
from motion_data.labels import center_class, ring_map

IGNORE = -100


# ============================================================== class weighting (stage 2)
def _normalise_under(weights: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Scale so that the expected weight under the label distribution ``freq`` is 1."""
    mean = float((weights * freq).sum())
    return weights / mean if mean > 0 else weights


def balanced_weights(counts, W: int, power: float = 1.0, min_weight: float = 0.0,
                     max_weight: float = 1e9, center_gamma: float = 1.0) -> np.ndarray:
    """``w_c ∝ 1 / freq_c ** power``, mean 1 under the labels, clipped, centre times ``center_gamma``.

    Classes never seen in ``counts`` get the largest weight of the seen ones (they are the
    rarest; they cannot appear in a batch drawn from that distribution anyway).
    """
    counts = np.asarray(counts, np.float64)
    if counts.shape != (W * W,):
        raise ValueError(f"class counts must have shape ({W * W},), got {counts.shape}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("class counts are all zero: no kept labels to weight by")
    freq = counts / total
    seen = freq > 0
    w = np.zeros_like(freq)
    w[seen] = freq[seen] ** (-float(power))
    w = _normalise_under(w, freq)
    w = np.clip(w, min_weight, max_weight)
    w[~seen] = w[seen].max()
    w[center_class(W)] *= center_gamma
    return w.astype(np.float32)


def ring_decay_weights(counts, W: int, center_gamma: float = 1.0, full_weight_ring: int = 2,
                       min_weight: float = 0.0, max_weight: float = 1e9) -> np.ndarray:
    """Weight by ring: ``center_gamma`` at ring 0 rising linearly to 1 at ``full_weight_ring``.

    The ramp is then normalised to mean 1 under the label distribution (uniform when
    ``counts`` is None) and clipped to [min_weight, max_weight]; clipping keeps it monotonic.
    """
    rings = ring_map(W).astype(np.float64)
    full = max(int(full_weight_ring), 1)
    w = center_gamma + (1.0 - center_gamma) * np.minimum(rings / full, 1.0)
    if counts is None:
        freq = np.full(W * W, 1.0 / (W * W))
    else:
        counts = np.asarray(counts, np.float64)
        if counts.shape != (W * W,):
            raise ValueError(f"class counts must have shape ({W * W},), got {counts.shape}")
        if counts.sum() <= 0:
            raise ValueError("class counts are all zero: no kept labels to weight by")
        freq = counts / counts.sum()
    w = np.clip(_normalise_under(w, freq), min_weight, max_weight)
    return w.astype(np.float32)


def class_weights_for(cw_cfg, counts, W: int) -> np.ndarray | None:
    """The ``(W*W,)`` weights of a ``training.class_weighting`` section (None for ``none``)."""
    if cw_cfg.method == "none":
        return None
    if cw_cfg.method == "balanced":
        if counts is None:
            return None
        return balanced_weights(counts, W, cw_cfg.power, cw_cfg.min_weight, cw_cfg.max_weight, cw_cfg.center_gamma)
    if cw_cfg.method == "ring_decay":
        return ring_decay_weights(counts, W, cw_cfg.center_gamma, cw_cfg.full_weight_ring,
                                  cw_cfg.min_weight, cw_cfg.max_weight)
    raise ValueError(f"unknown class_weighting.method {cw_cfg.method!r}")


def class_counts_from_stats(build_dir, static_filter, W: int) -> np.ndarray:
    """Kept-label counts ``(W*W,)`` of a build under ``static_filter``, from ``stats.zarr``."""
    from motion_data.stats import filtered_counts_from_hist
    from motion_data.store import StoreError, read_hists

    path = Path(build_dir) / "stats.zarr"
    try:
        points, topk = read_hists(path, [static_filter.metric])[static_filter.metric]
    except (StoreError, KeyError) as e:
        raise ValueError(f"{path}: no class histograms for metric {static_filter.metric!r} ({e})") from None
    if points.shape[-1] != W * W + 1:
        raise ValueError(f"{path}: histograms are for {points.shape[-1] - 1} classes, expected W*W={W * W}")
    if static_filter.enable:
        counts, _ = filtered_counts_from_hist(points, topk, static_filter.threshold, static_filter.min_keep)
    else:
        counts = points.sum(axis=0)[:-1]
    return counts.astype(np.int64)


def count_classes(batches, num_classes: int) -> np.ndarray:
    """Kept-label counts over an iterable of loader batches (dicts with ``labels``, ``mask``)."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for b in batches:
        counts += torch.bincount(b["labels"][b["mask"]].reshape(-1).cpu(), minlength=num_classes)[:num_classes]
    return counts.numpy()


def class_weights_image(weights, W: int) -> np.ndarray:
    """``(1, W, W)`` float32 in [0, 1] (weights / max) for ``SummaryWriter.add_image`` (CHW)."""
    w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, np.float32).reshape(W, W)
    top = float(w.max())
    return (w / top if top > 0 else w)[None]


def _atomic_write(path: Path, write):
    with atomic_open(path, "wb") as f:
        write(f)


def save_class_weights(path, weights, W: int, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<path>.npy`` ((W, W) float32, row = dy, col = dx) and ``<path>.json``."""
    path = Path(path)
    if path.suffix in (".npy", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, np.float32).reshape(W, W)
    npy, js = path.with_suffix(".npy"), path.with_suffix(".json")
    _atomic_write(npy, lambda f: np.save(f, w, allow_pickle=False))
    doc = {"W": W, "center_class": center_class(W), "weights": w.tolist(), **(meta or {})}
    _atomic_write(js, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    return npy, js


# ====================================================================== the criterion
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
        alpha = self.focal_cfg.alpha if self.focal_cfg.enabled else None
        if alpha == "per_class" and self.cw_cfg.method == "none":
            raise ValueError("training.focal.alpha 'per_class' needs training.class_weighting.method "
                             "balanced or ring_decay (the per-class alphas are the class weights)")
        self.alpha = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None
        self.gamma = float(self.focal_cfg.gamma) if self.focal_cfg.enabled else 0.0
        self._counts = None if class_counts is None else np.asarray(class_counts, np.int64).copy()
        self._weights_dev = None
        self.class_weights = None
        self._refresh()

    @property
    def class_counts(self):
        return self._counts

    @property
    def needs_counts(self) -> bool:
        """True while the configured weighting still waits for class counts."""
        return self.cw_cfg.method == "balanced" and self.class_weights is None

    def _refresh(self):
        w = class_weights_for(self.cw_cfg, self._counts, self.W)
        self.class_weights = None if w is None else torch.from_numpy(w)
        self._weights_dev = None

    def set_class_counts(self, counts):
        self._counts = np.asarray(counts, np.int64).copy()
        self._refresh()

    def update_counts(self, labels, mask):
        """Add a batch's kept labels to the running counts and recompute the weights."""
        add = torch.bincount(labels[mask].reshape(-1).cpu(), minlength=self.num_classes)[:self.num_classes].numpy()
        self._counts = add.astype(np.int64) if self._counts is None else self._counts + add
        if self._counts.sum() > 0:
            self._refresh()

    def _weights_on(self, device):
        if self._weights_dev is None or self._weights_dev.device != device:
            self._weights_dev = self.class_weights.to(device)
        return self._weights_dev

    def __call__(self, logits, labels, mask):
        K = logits.shape[-1]
        if K != self.num_classes:
            raise ValueError(f"logits have {K} classes, expected W*W={self.num_classes}")
        if self.needs_counts:
            raise RuntimeError("class_weighting.method balanced has no class counts yet: pass class_counts, "
                               "call set_class_counts() or update_counts() first")
        flat = logits.reshape(-1, K)
        m = mask.reshape(-1)
        target = labels.reshape(-1).masked_fill(~m, IGNORE)
        count = m.sum()
        denom = count.clamp_min(1).to(torch.float32)
        if self.gamma == 0.0 and self.class_weights is None and self.alpha is None:
            # the baseline: bitwise F.cross_entropy(..., ignore_index) mean, but 0 (with a
            # gradient) instead of NaN for an empty mask
            loss = F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum") / denom
            return loss, {"ce": loss.detach(), "count": count.detach()}
        ce = F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="none")  # 0 where ignored
        per = ce
        if self.gamma != 0.0:
            # 1 - p = -expm1(-ce) is exact near p = 1; the floor keeps (.)**gamma finite in
            # the backward pass for gamma < 1 (ignored entries have p = 1 exactly)
            per = (-torch.expm1(-ce)).clamp_min(1e-12).pow(self.gamma) * per
        if self.class_weights is not None:
            per = per * self._weights_on(per.device)[target.clamp_min(0)]
        if self.alpha is not None:
            per = per * self.alpha
        loss = per.sum() / denom
        return loss, {"ce": ce.detach().sum() / denom, "count": count.detach()}


# ===================================================== code-usage regulariser (stage 1)
def fsq_levels_grid(levels) -> list[torch.Tensor]:
    """Per channel, the integer values FSQ's rounding picks from: ``arange(L) - L // 2``.

    FSQ.bound maps a channel to ``tanh(z + shift) * (L-1)(1+eps)/2 - offset`` (offset 0.5
    for even L) and rounds it, so odd L gives -(L-1)/2..(L-1)/2 and even L gives
    -L/2..L/2-1 (e.g. 8 -> -4..3); the code is that integer / (L // 2).
    """
    return [torch.arange(int(L), dtype=torch.float32) - int(L) // 2 for L in levels]


def fsq_prerounding(z, levels, eps: float = 1e-3, hard_clamp: bool = False):
    """FSQ.bound without the rounding: ``(..., d)`` values on the integer level grid.

    ``round(fsq_prerounding(z)) / (L // 2)`` equals ``FSQ.quantize(z)`` (a test checks it
    against the installed vector-quantize-pytorch).
    """
    L = torch.as_tensor(list(levels), dtype=torch.float32, device=z.device)
    z = z.float()
    half_l = (L - 1) * (1 + eps) / 2
    offset = torch.where(L.remainder(2) == 0, 0.5, 0.0)
    if hard_clamp:
        return z.clamp(-1.0, 1.0) * half_l - offset
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z + shift) * half_l - offset


def fsq_prerounding_from_module(fsq, z):
    """Bounded pre-rounding values of an ``FSQ`` module for its input ``z`` (..., fsq.dim)."""
    if fsq.preserve_symmetry or fsq.num_codebooks != 1 or fsq.orthogonal_rotation:
        raise ValueError("code_usage_loss supports FSQ without preserve_symmetry, orthogonal_rotation "
                         "or several codebooks")
    levels = fsq._levels.tolist()
    return fsq_prerounding(fsq.project_in(z), levels, hard_clamp=fsq.bound_hard_clamp)


def _soft_assign(z_bounded, levels, temperature):
    """Per channel ``(M, L_c)`` softmax(-(z - level)^2 / temperature) in float32."""
    z = z_bounded.float()
    out = []
    for c, grid in enumerate(fsq_levels_grid(levels)):
        d2 = (z[:, c:c + 1] - grid.to(z.device)) ** 2
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
        import torch.distributed.nn.functional as dnn

        P = dnn.all_reduce(P)
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
    """Differentiable code-usage term from FSQ's bounded pre-rounding values (DESIGN.md Trainer).

    ``z_bounded`` (M, d): :func:`fsq_prerounding` of the FSQ input, one row per token.
    Returns ``(loss_term, soft_entropy_norm)``; the caller adds ``λ * loss_term`` to CE.
    LFQ / MAGVIT-v2 form: the entropy H(p) of the average soft code distribution goes up
    and, with ``token_weight`` > 0, each token's own assignment entropy goes down (so usage
    is not spread by ambiguous tokens that straddle rounding boundaries):
    ``kind="entropy"``: ``(-H(p) + token_weight * mean_token_H) / log K``;
    ``"kl_uniform"``: ``KL(p || U) + token_weight * mean_token_H = log K - H(p) + ...`` (nats).
    ``running``: a :class:`tokenizer_train.code_usage.RunningCodeAverage`; ``p`` is then its
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
        raise ValueError(f"model.fsq_levels {list(levels)} give K={K} codes, more than the regulariser's exact "
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
        p = running.mix(p, float(n))
    H = _entropy(p)
    term = -H / log_k if kind == "entropy" else log_k - H
    if token_weight:
        own = token_code_entropy(z_bounded, levels, temperature).sum()
        if _dist_ready(distributed):
            import torch.distributed.nn.functional as dnn

            own = dnn.all_reduce(own)
        own = own / n.clamp_min(1.0)
        term = term + token_weight * (own / log_k if kind == "entropy" else own)
    return term, (H / log_k).detach()


def hard_code_entropy(indices, K: int) -> float:
    """Entropy (nats) of the histogram of hard code ids (the metric, not a loss)."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def entropy_weight(weight: float, warmup_epochs: float, epoch_float: float) -> float:
    """λ at a (fractional) epoch: linear from 0 at epoch 0 to ``weight`` at ``warmup_epochs``."""
    if weight == 0.0 or warmup_epochs <= 0:
        return float(weight)
    return float(weight) * min(max(epoch_float / warmup_epochs, 0.0), 1.0)
