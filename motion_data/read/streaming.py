"""The loader's streaming mode (``sampler.mode = "streaming"``): webdataset's resampler picks
whole shards, each read through ``shard_reader.read_batch`` in chunks; every clip is emitted
in proportion to its weight, shuffled in a buffer and batched by ``batch.make_batch``."""
from __future__ import annotations

import numpy as np
import torch

from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError
from motion_data.common.storage import location
from motion_data.read.batch import BatchRecipe, make_batch
from motion_data.read.ranges import ranges_for
from motion_data.read.sampler import epoch_rng
from motion_data.read.shard_reader import SampleRefs, read_batch


class StreamState:
    """Streaming-mode stages and their shared epoch (a shared-memory tensor, so persistent
    workers see ``set_epoch``); per-worker errors are carried out inside the batches.

    ``shard_rows``: per shard path, the split's manifest rows in it, in file order
    (``offset``, ``size``, ``clip_id``, ``checksum``, ``weight`` = w / mean(w) arrays)."""

    CHUNK = 64  # samples per read_batch call

    def __init__(self, root, shard_rows: dict, recipe: BatchRecipe, seed: int, rank: int, on_error: str):
        self.root, self.shard_rows, self.recipe = root, shard_rows, recipe
        b = BuildDir(root)
        self.S, self.N = b.S, b.N
        self.seed, self.rank, self.on_error = seed, rank, on_error
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.errors: list = []
        self.fds = ranges_for(location(root))
        self._rng = None

    def worker_seed(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        return int(epoch_rng(self.seed, int(self.epoch[0]), self.rank, wid).integers(2 ** 62))

    def weighted(self, src):
        """Read each resampled shard's samples (``shard_reader.read_batch``) and emit each
        ``floor(m) + Bernoulli(frac(m))`` times, ``m = w / mean(w)``.

        Shards are resampled uniformly, so every clip is visited at the same rate whatever
        its shard's size; the repetition makes its expected frequency proportional to w.
        """
        rng = np.random.default_rng(self.worker_seed())
        self._rng = None  # the augmentation stream restarts with each epoch too
        for item in src:
            url = item["url"]
            r = self.shard_rows[url]
            for lo in range(0, len(r["clip_id"]), self.CHUNK):
                sl = slice(lo, lo + self.CHUNK)
                keys = r["clip_id"][sl]
                refs = SampleRefs([url] * len(keys), r["offset"][sl], r["size"][sl], keys, r["checksum"][sl])
                pos, vis, st, ok, err = read_batch(self.fds, refs, self.S + 1, self.N)
                for j, m in enumerate(r["weight"][sl]):
                    reps = int(m) + (rng.random() < m - int(m))
                    if reps == 0:
                        continue
                    if not ok[j]:
                        if self.on_error == "fail":
                            raise DataError(err[j])
                        self.errors.append(err[j])
                        continue
                    d = {"pos": pos[j], "vis": vis[j], "stats": st[j]}
                    for _ in range(reps):
                        yield keys[j], d

    def collate(self, items):
        pos = np.stack([d["pos"] for _, d in items])
        vis = np.stack([d["vis"] for _, d in items])
        st = np.stack([d["stats"] for _, d in items])
        if self._rng is None:
            self._rng = np.random.default_rng(self.worker_seed() + 1)
        batch = make_batch(pos, vis, st, [k for k, _ in items], self.recipe, self._rng,
                           packed=torch.utils.data.get_worker_info() is not None)
        batch["skipped"], self.errors = self.errors, []
        return batch


def stream_pipeline(state: StreamState, batch_size: int, shuffle_buffer: int):
    import webdataset as wds

    return wds.DataPipeline(
        wds.ResampledShards(sorted(state.shard_rows), seed=state.seed, worker_seed=state.worker_seed,
                            deterministic=True),
        state.weighted,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 4 * batch_size)),
        wds.batched(batch_size, collation_fn=state.collate, partial=False),
    )


def shard_rows(root, man: dict, rows, weights) -> dict:
    """``StreamState.shard_rows`` of the split's ``rows`` (weights relative to their mean)."""
    rel = weights / weights.mean()
    out: dict = {}
    for r, w in sorted(zip(rows, rel), key=lambda x: (man["shard"][x[0]], man["offset"][x[0]])):
        d = out.setdefault(str(root / man["shard"][r]), {k: [] for k in ("offset", "size", "clip_id", "checksum",
                                                                          "weight")})
        for k in ("offset", "size", "clip_id", "checksum"):
            d[k].append(man[k][r])
        d["weight"].append(float(w))
    # every shard of the build stays in the resampled list (a clip-less one yields nothing),
    # so the shard draw is the same whatever the split
    for s in set(man["shard"]):
        out.setdefault(str(root / s), {k: [] for k in ("offset", "size", "clip_id", "checksum", "weight")})
    return out
