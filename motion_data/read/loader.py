"""The training/validation data loader over a build folder (one entry point: ``make_loader``).

Batches follow the binding contract (docs/DESIGN.md): ``positions`` ``(B, T, N, 2)``
float32 reference pixels, ``velocities`` ``(B, S, N, 2)`` float32 normalised
``normalize(diff(positions))``, ``labels`` ``(B, S, N)`` int64 (the build's label rule on
``positions``), ``mask`` ``(B, S, N)`` bool (static filter AND valid), ``valid``,
``eval_mask`` ``(B, S, N)`` bool (the build's recorded filter AND valid, whatever the run's
filter: every validation figure is scored on it), ``clip_id`` list and ``dynamic_ratio`` ``(B,)``.

Per sample only raw arrays are read (``pos``, ``vis``, the stored per-point ``stats``) and
checked against the manifest's ``checksum``; the static-filter mask (``stats.keep_mask`` on
the batch rows, current filter config), velocities, augmentation and labels are computed
once per batch, vectorised, in ``make_batch``.

Exact mode (default) reads each batch's samples by the byte ranges recorded in the
manifest, streaming mode (``streaming.py``) reads whole shards picked by webdataset's
resampler; both through ``shard_reader.read_batch``, the one reader (every sample checked:
tar layout, array headers, finite values, the manifest's CRC-32). Batch assembly is
``batch.make_batch``.

Errors: ``on_error="fail"`` raises ``DataError`` naming the shard; ``"skip"`` drops the
sample from its batch (so the batch is smaller), counts it in ``loader.skipped`` and logs
one warning per sample.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from motion_data.read.augment import AugmentConfig
from motion_data.read.batch import BatchRecipe, make_batch, packed_bytes, unpack_batch
from motion_data.read.sampler import (Affinity, IndexBatch, SamplerConfig, SequentialBatchSampler, WeightedBatchSampler,
                                     epoch_rng, sampling_weights)
from motion_data.read.ranges import ranges_for
from motion_data.read.shard_reader import SampleRefs, read_batch
from motion_data.read.split import split_manifest
from motion_data.read.streaming import StreamState, shard_rows, stream_pipeline
from motion_data.common.static_filter import DEFAULT_FILTER, StaticFilter
from motion_data.build.folder import BuildDir
from motion_data.common.worker_ring import make_ring
from motion_data.common.workers import loader_worker_context, loader_worker_init, resolve_workers
from motion_data.common.errors import DataError, SettingError
from motion_data.common.storage import location

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")
ON_ERROR = ("fail", "skip")
# manifest columns the loader (and tokenize) read
MANIFEST_COLUMNS = ["clip_id", "source", "split_group", "start_frame", "shard", "offset", "size", "checksum"]


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader delivers its batches, whatever the data: batch size, clips per epoch
    over all ranks (None: the sampler's, else the split's clip count), the seed, this
    process's rank among ``world_size``, what an unreadable sample does (``on_error``:
    fail or skip), the streaming shuffle buffer, and the DataLoader workers (a count or
    ``"auto"`` for ``device``, the device type the batches go to; default cuda when
    available), pinned memory, persistence and prefetch."""
    batch_size: int = 32
    epoch_size: int | None = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    on_error: str = "fail"
    shuffle_buffer: int = 1000
    num_workers: int | str = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    device: str | None = None


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset over manifest rows; ``__getitems__`` returns a whole batch dict."""

    def __init__(self, build_dir, manifest: dict, flt: StaticFilter, augment: AugmentConfig | None = None,
                 seed: int = 0, on_error: str = "fail", eval_filter: StaticFilter = DEFAULT_FILTER):
        """``manifest``: columns ``MANIFEST_COLUMNS`` of the build's manifest; ``eval_filter``
        the build's recorded filter (``eval_mask``)."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = location(build_dir)
        b = BuildDir(self.root)
        self.recipe = BatchRecipe.of_build(b, flt, augment, eval_filter)
        self.S, self.N = b.S, b.N
        self.checksum = np.asarray(manifest["checksum"], np.int64)
        self.shard_paths = sorted(set(manifest["shard"]))
        self._paths = [str(self.root / p) for p in self.shard_paths]
        code = {s: i for i, s in enumerate(self.shard_paths)}
        self.shard_of = np.fromiter((code[s] for s in manifest["shard"]), np.int32, len(manifest["shard"]))
        self.offset = np.asarray(manifest["offset"], np.int64)
        self.size = np.asarray(manifest["size"], np.int64)
        self.clip_id = list(manifest["clip_id"])
        self.seed, self.on_error = seed, on_error
        # workers send packed batches only to a MotionLoader, which unpacks them; any other
        # DataLoader over this dataset gets contract dicts
        self.packed = False
        self.ring = None  # worker_ring.WorkerRing the workers pack into (make_loader sets it)
        self.fds = ranges_for(self.root)  # local: bounded, a 120-shard build trains under `ulimit -n 64`

    def __len__(self):
        return len(self.clip_id)

    def read_rows(self, rows):
        """``shard_reader.read_batch`` of manifest rows, in file order (sequential access
        within each shard); returns (pos, vis, stats, ok, errors) in ``rows`` order."""
        rows = np.asarray(rows, np.int64)
        order = np.lexsort((self.offset[rows], self.shard_of[rows]))
        r = rows[order]
        refs = SampleRefs([self._paths[s] for s in self.shard_of[r]], self.offset[r], self.size[r],
                          [self.clip_id[i] for i in r], self.checksum[r])
        return read_batch(self.fds, refs, self.S + 1, self.N, dest=order)

    def read(self, row: int) -> dict:
        """Raw arrays of one clip; ``DataError`` naming the shard when it cannot be read."""
        pos, vis, st, ok, err = self.read_rows([int(row)])
        if not ok[0]:
            raise DataError(err[0])
        return {"pos": pos[0], "vis": vis[0], "stats": st[0], "checksum": int(self.checksum[int(row)])}

    def __getitem__(self, row):
        return self.read(row)

    def __getitems__(self, rows) -> dict:
        key = getattr(rows, "key", (0, 0, 0))  # IndexBatch: seeds this batch's augmentation
        rows = list(rows)
        pos, vis, st, ok, err = self.read_rows(rows)
        errors = [e for e in err if e is not None]
        if errors and self.on_error == "fail":
            raise DataError(errors[0])
        ids = [self.clip_id[r] for r, g in zip(rows, ok) if g]
        if not ok.all():
            pos, vis, st = pos[ok], vis[ok], st[ok]
        rng = epoch_rng(self.seed, *key, 1)
        packed = self.packed and torch.utils.data.get_worker_info() is not None
        slot, into = self.ring.next_slot() if packed and self.ring is not None else (None, None)
        batch = make_batch(pos, vis, st, ids, self.recipe, rng, packed=packed, into=into)
        if slot is not None:
            batch["_packed"] = slot  # the main process reads the slot (MotionLoader.ring)
        batch["skipped"] = errors
        return batch


def _identity(batch):
    return batch


def rank0_weights(compute, n: int, world_size: int) -> np.ndarray:
    """Clip weights bit-identical on every rank: ``compute()`` on rank 0 only, broadcast to the
    others when a process group is up (a rank computing in another float order would
    otherwise draw other clips)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return compute()
    mine = compute() if dist.get_rank() == 0 else np.empty(n, np.float64)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.as_tensor(np.ascontiguousarray(mine, np.float64)).to(dev)
    dist.broadcast(t, 0)
    return t.cpu().numpy()


# ----------------------------------------------------------------------------- the loader

class MotionLoader:
    """Iterable of batches; ``len`` = batches per epoch on this rank.

    Call ``set_epoch(e)`` before each epoch: a different or finished epoch starts at batch
    0, the current unfinished one keeps its (resumed) position. Iterating again after a
    finished epoch without ``set_epoch`` moves on to the next epoch.

    ``state_dict()`` records the epoch and the batches already *delivered* (not merely
    prefetched by workers); after ``load_state_dict()`` the next iteration continues with the
    identical remaining batches (exact mode and validation; streaming mode resumes with the
    right number of remaining batches but a fresh random stream). ``skipped`` counts samples
    dropped by ``on_error="skip"``.

    ``generator`` is the DataLoader's: reseeded from (seed, epoch, rank) before each epoch,
    it gives the workers' base seed, which torch otherwise draws from the global RNG when
    an iteration starts; so starting (or resuming) an epoch leaves the trainer's RNG stream
    (dropout, noise) untouched and a mid-epoch resume replays it exactly.
    """

    def __init__(self, dataloader, batch_sampler=None, stream_state=None, n_batches: int = 0, *,
                 generator: torch.Generator | None = None, seed: int = 0, rank: int = 0, pin: bool = False):
        self.dataloader = dataloader
        self.batch_sampler = batch_sampler
        self.stream_state = stream_state
        self._n_batches = n_batches
        self.generator, self.seed, self.rank, self.pin = generator, seed, rank, pin
        self.epoch = 0
        self.batches_done = 0
        self.skipped = 0
        self.skipped_messages: list[str] = []

    @property
    def dataset(self):
        return self.dataloader.dataset

    def __len__(self):
        return len(self.batch_sampler) if self.batch_sampler is not None else self._n_batches

    def set_epoch(self, epoch: int):
        if int(epoch) != self.epoch or self.batches_done >= len(self):
            self.epoch, self.batches_done = int(epoch), 0
        self._sync_epoch()

    def _sync_epoch(self):
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(self.epoch)
        if self.stream_state is not None:
            self.stream_state.epoch[0] = self.epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.skipped = int(state.get("skipped", 0))
        self._sync_epoch()

    def __iter__(self):
        if self.batches_done >= len(self):  # the last epoch was finished: go on with the next
            self.set_epoch(self.epoch + 1)
        if self.batch_sampler is not None:
            self.batch_sampler.start_batch = self.batches_done
        if self.generator is not None:
            self.generator.manual_seed(int(epoch_rng(self.seed, self.epoch, self.rank, 2 ** 31 - 1).integers(2 ** 62)))
        ring = getattr(getattr(self.dataloader, "dataset", None), "ring", None)
        for batch in self.dataloader:
            batch = unpack_batch(batch, self.pin, ring)
            errors = batch.pop("skipped", [])
            if errors:
                self.skipped += len(errors)
                self.skipped_messages.extend(errors[:100])
                for e in errors:
                    log.warning("skipped unreadable sample: %s", e)
            self.batches_done += 1
            yield batch
            if self.batches_done >= len(self):
                break


def make_loader(build_dir, options: LoaderOptions | None = None, *, split: str = "train",
                static_filter: StaticFilter | None = None, sampler: SamplerConfig | None = None,
                augment: AugmentConfig | None = None, val_split: float = 0.1) -> MotionLoader:
    """The data loader of a build folder, delivering as ``options`` say (default
    ``LoaderOptions()``).

    split: ``train`` (weighted sampler, augmentation), ``val`` (every held-out clip once, in
    order, no weighting or augmentation) or ``all`` (every clip, weighted like train);
    ``val_split`` the held-out share. ``options.epoch_size`` (default ``sampler.epoch_size``,
    else the split's clip count) sets ``len(loader) = max(1, epoch_size // (batch_size *
    world_size))``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    o = options or LoaderOptions()
    num_workers = resolve_workers(o.num_workers, o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flt = static_filter or StaticFilter()
    sampler = sampler or SamplerConfig()
    root = location(build_dir)
    build = BuildDir(root)
    info = build.info()
    W, T, N = info["W"], info["T"], info["N"]
    man = build.manifest(MANIFEST_COLUMNS)  # checked against the store's clip count
    train_rows, val_rows = split_manifest(man, val_split, T)
    rows = {"train": train_rows, "val": val_rows, "all": np.arange(len(man["clip_id"]))}[split]
    if len(rows) == 0:
        raise SettingError(f"{root}: the {split!r} split is empty (val_split={val_split})")
    training = split != "val"
    aug = augment if (training and augment is not None and augment.enabled) else None
    epoch_size = o.epoch_size if o.epoch_size is not None else sampler.epoch_size
    gen = torch.Generator()
    pin = bool(o.pin_memory and torch.cuda.is_available())
    loader_kw = {"generator": gen, "seed": o.seed, "rank": o.rank, "pin": pin}
    worker_kw = {}
    if num_workers > 0:
        # exit_with_parent: workers die at once with the trainer (torch's own check polls every 5 s);
        # they ignore Ctrl-C/SIGTERM so that the trainer can save a checkpoint first
        worker_kw = {"persistent_workers": o.persistent_workers,
                     "multiprocessing_context": loader_worker_context(__name__),
                     "worker_init_fn": functools.partial(loader_worker_init, os.getpid())}
        if o.prefetch_factor is not None:
            worker_kw["prefetch_factor"] = o.prefetch_factor

    weigh = functools.partial(sampling_weights, root, flt, sampler, rows)
    B, world = o.batch_size, o.world_size
    if training and sampler.mode == "streaming":
        weights = rank0_weights(weigh, len(rows), world)
        recipe = BatchRecipe.of_build(build, flt, aug, info["build_filter"])
        state = StreamState(root, shard_rows(root, man, rows, weights), recipe, o.seed, o.rank, o.on_error)
        pipe = stream_pipeline(state, B, o.shuffle_buffer)
        n_batches = max(1, (epoch_size or len(rows)) // (B * world))
        import webdataset as wds

        dl = wds.WebLoader(pipe, batch_size=None, num_workers=num_workers, pin_memory=o.pin_memory,
                           generator=gen, **worker_kw)
        dl = dl.with_epoch(n_batches)
        return MotionLoader(dl, stream_state=state, n_batches=n_batches, **loader_kw)

    dataset = ClipDataset(root, man, flt, aug, o.seed, o.on_error, info["build_filter"])
    dataset.packed = True
    if num_workers > 0:
        dataset.ring = make_ring(num_workers, o.prefetch_factor, packed_bytes(B, T - 1, N, W))
    if training:
        aff = Affinity(dataset.shard_of[rows], sampler.affinity_window) if sampler.shard_affinity else None
        bs = WeightedBatchSampler(rows, rank0_weights(weigh, len(rows), world), B, epoch_size, o.seed,
                                  o.rank, world, aff)
    else:
        bs = SequentialBatchSampler(rows, B, o.rank, world)
    dl = torch.utils.data.DataLoader(dataset, batch_sampler=bs, collate_fn=_identity, num_workers=num_workers,
                                     pin_memory=o.pin_memory, generator=gen, **worker_kw)
    return MotionLoader(dl, batch_sampler=bs, **loader_kw)


__all__ = ["make_loader", "LoaderOptions", "MotionLoader", "ClipDataset", "IndexBatch"]
