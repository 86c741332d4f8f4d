"""Clip sampling: weights from stored statistics and the exact per-epoch batch sampler.

Weights come from ``stats.zarr`` under the *current* static filter (``stats.dynamic_ratio``,
a numba kernel; shards are never read), so changing the filter never needs a rebuild.

Exact mode draws each epoch by *systematic sampling*: clips are put in a random order, laid
end to end on [0, 1) with lengths proportional to their weights, and ``M`` equally spaced
points with one random offset pick the clips. Each clip is drawn ``floor(M p_i)`` or
``ceil(M p_i)`` times (expectation exactly ``M p_i``), so frequencies match the weights with
far less variance than independent draws; with uniform weights and ``M`` = number of clips
it is an ordinary shuffled epoch with every clip once. The draw is then shuffled, cut into
equal per-rank slices and batches.

With ``shard_affinity`` the same draw (the same multiset of clips, the same batch counts) is
ordered by a per-epoch permutation of the shards before it is cut, and then shuffled only
within windows of ``affinity_window`` batches of each rank: a rank reads about 1/world of
the shards in an epoch, and a few shards at a time, which is what a whole-shard cache of
remote builds needs (``shard_cache``). Batches then mix the clips of a few shards only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from motion_data.common.static_filter import StaticFilter

from motion_data.build.stats import dynamic_ratio
from motion_data.common.errors import SettingError

METHODS = ("uniform", "dynamic_ratio")
MODES = ("exact", "streaming")


@dataclass
class SamplerConfig:
    """``data.sampler``: clip weight ``max(min_weight, r) ** power`` for ``dynamic_ratio``.

    ``epoch_size``: clips drawn per epoch over all ranks (None = the clips of the split).
    """

    method: str = "uniform"  # uniform | dynamic_ratio
    power: float = 1.0
    min_weight: float = 0.05
    mode: str = "exact"  # exact | streaming
    epoch_size: int | None = None
    shard_affinity: bool = False  # group each rank's draws by shard (exact mode)
    affinity_window: int = 16  # batches of a rank shuffled together under shard_affinity

    def __post_init__(self):
        if self.shard_affinity and self.mode != "exact":
            raise SettingError("sampler.shard_affinity groups exact-mode draws; streaming mode reads whole shards "
                               "already: set sampler.mode=exact or shard_affinity=false")
        if self.affinity_window < 1:
            raise SettingError(f"sampler.affinity_window must be >= 1, got {self.affinity_window}")
        if self.method not in METHODS:
            raise SettingError(f"sampler.method must be one of {METHODS}, got {self.method!r}")
        if self.mode not in MODES:
            raise SettingError(f"sampler.mode must be one of {MODES}, got {self.mode!r}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise SettingError(f"sampler.epoch_size must be >= 1, got {self.epoch_size}")


def clip_weights(ratio: np.ndarray, cfg: SamplerConfig) -> np.ndarray:
    """``(C,)`` float64 weights from per-clip dynamic ratios."""
    ratio = np.asarray(ratio, np.float64)
    if cfg.method == "uniform":
        return np.ones_like(ratio)
    return np.maximum(cfg.min_weight, ratio) ** cfg.power


def sampling_weights(build_dir, flt: StaticFilter, cfg: SamplerConfig, rows) -> np.ndarray:
    """``(len(rows),)`` weights of the clips ``rows``. ``dynamic_ratio`` measures a clip's
    dynamic share by the configured filter's definition (metric, threshold, min_keep) also
    when ``flt.enable`` is off: ``enable`` decides which points enter the loss, not what the
    sampler weighs by (with it off the ratio would be 1 for every clip: uniform in silence)."""
    if cfg.method == "uniform":
        return np.ones(len(rows), np.float64)
    return clip_weights(load_dynamic_ratio(build_dir, dataclasses.replace(flt, enable=True))[rows], cfg)


def load_dynamic_ratio(build_dir, flt: StaticFilter) -> np.ndarray:
    """``(C,)`` float32 kept share of every clip under ``flt``, from ``stats.zarr``."""
    from motion_data.build.folder import BuildDir

    b = BuildDir(build_dir)
    g, n = b.store, b.n_clips
    if not flt.enable:
        return np.ones(n, np.float32)
    scores, vc = g[f"stats/{flt.metric}"], g["stats/valid_count"]
    out = np.empty(n, np.float32)
    step = 1 << 16  # bounded memory: 65536 clips x N points at a time
    for lo in range(0, n, step):
        out[lo:lo + step] = dynamic_ratio(scores[lo:lo + step], vc[lo:lo + step], flt)
    return out


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), *stream]))


def systematic_draw(weights: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` indices into ``weights``, clip i ``floor``/``ceil`` of ``m w_i / sum(w)`` times, shuffled."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sampler weights must be finite, non-negative and not all zero")
    perm = rng.permutation(len(w))
    edges = np.cumsum(w[perm])
    edges /= edges[-1]
    points = (rng.random() + np.arange(m)) / m
    picked = perm[np.minimum(np.searchsorted(edges, points, side="right"), len(w) - 1)]
    return picked[rng.permutation(m)]


def group_by_shard(picked: np.ndarray, shard_of: np.ndarray, parts: int, window: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``picked`` (indices into ``shard_of``) reordered: by a random permutation of the shards,
    then shuffled within consecutive windows of ``window`` draws of each of ``parts`` equal
    parts. The multiset is unchanged."""
    rank_of_shard = rng.permutation(int(shard_of.max()) + 1)
    out = picked[np.argsort(rank_of_shard[shard_of[picked]], kind="stable")]
    per = len(out) // parts
    place = np.arange(len(out))
    block = (place // per) * (per // window + 1) + (place % per) // window
    return out[np.lexsort((rng.random(len(out)), block))]


@dataclass(frozen=True)
class Affinity:
    """``shard_affinity``: the shard of each row (codes 0..S-1) and the window in batches."""
    shard_of: np.ndarray
    window: int = 16


class IndexBatch(list):
    """A batch of row indices that also carries its place ``(epoch, rank, batch)``.

    The place seeds the batch's augmentation, so a resumed or re-run epoch reproduces it
    whichever worker builds it.
    """

    def __init__(self, rows, key):
        super().__init__(rows)
        self.key = tuple(int(k) for k in key)

    def __reduce__(self):
        return (IndexBatch, (list(self), self.key))


class WeightedBatchSampler:
    """Exact-mode batch sampler (pass as ``batch_sampler`` to a DataLoader).

    rows: the manifest rows of the split; weights: their weights. Every epoch draws
    ``world_size * len(self) * batch_size`` clips (``len(self) = max(1, epoch_size //
    (batch_size * world_size))`` batches per rank; the draw is ``epoch_size`` rounded down to
    whole batches), identical on every rank given (seed, epoch); rank r takes the r-th
    contiguous slice, so ranks never share a draw. Each batch goes to exactly one
    DataLoader worker. ``start_batch`` skips already consumed batches on resume.
    ``affinity`` groups the draw by shard (``group_by_shard``).
    """

    def __init__(self, rows, weights, batch_size: int, epoch_size: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, affinity: Affinity | None = None):
        self.rows = np.asarray(rows, np.int64)
        self.weights = np.asarray(weights, np.float64)
        if len(self.rows) != len(self.weights):
            raise ValueError("rows and weights differ in length")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), rank, world_size
        self.epoch_size = int(epoch_size) if epoch_size is not None else len(self.rows)
        self.epoch = 0
        self.start_batch = 0
        self.affinity = affinity
        if affinity is not None and len(affinity.shard_of) != len(self.rows):
            raise ValueError("affinity.shard_of and rows differ in length")

    def __len__(self) -> int:
        return max(1, self.epoch_size // (self.batch_size * self.world_size))

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def epoch_draw(self, epoch: int) -> np.ndarray:
        """The global draw of an epoch: ``(world_size, len(self), batch_size)`` manifest rows."""
        nb = len(self)
        m = self.world_size * nb * self.batch_size
        picked = systematic_draw(self.weights, m, epoch_rng(self.seed, epoch))
        if self.affinity is not None:
            picked = group_by_shard(picked, self.affinity.shard_of, self.world_size,
                                    self.affinity.window * self.batch_size, epoch_rng(self.seed, epoch, 3))
        return self.rows[picked].reshape(self.world_size, nb, self.batch_size)

    def __iter__(self):
        mine = self.epoch_draw(self.epoch)[self.rank]
        for b in range(self.start_batch, len(mine)):
            yield IndexBatch(mine[b].tolist(), (self.epoch, self.rank, b))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["start_batch"])


class SequentialBatchSampler:
    """Validation: every row of the split once, in order, no weighting.

    Rank r takes the r-th contiguous share; every rank yields the same number of batches
    (sizes differ by at most one, a batch may be empty when there are fewer clips than
    ranks times batches), so DDP collectives stay in step without padding duplicates.
    """

    def __init__(self, rows, batch_size: int, rank: int = 0, world_size: int = 1):
        self.rows = np.asarray(rows, np.int64)
        self.batch_size, self.rank, self.world_size = int(batch_size), rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def _share(self):
        return np.array_split(self.rows, self.world_size)[self.rank]

    def __len__(self) -> int:
        per_rank = -(-len(self.rows) // self.world_size)
        return max(1, -(-per_rank // self.batch_size))

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __iter__(self):
        parts = np.array_split(self._share(), len(self))
        for b in range(self.start_batch, len(parts)):
            yield IndexBatch(parts[b].tolist(), (self.epoch, self.rank, b))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict):
        self.epoch, self.start_batch = int(state["epoch"]), int(state["start_batch"])
