"""The worker side of build-shards: load one input file and cut it into clips, and the
pool (:class:`Runner`) that runs loads and shard writes, inline or in worker processes.

Results come back in input order, so the output does not depend on the worker count.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from motion_data.common.clips import window_starts
from motion_data.common.errors import DataError, SettingError, one_line
from motion_data.sources.importers import iter_sequences
from motion_data.common.parent_death import exit_with_parent


@dataclass(frozen=True)
class SpoolRef:
    """Clips ``lo:hi`` of a spooled ``.npy`` array (what travels instead of the data)."""

    path: str
    lo: int
    hi: int

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, sl: slice) -> "SpoolRef":
        a, b, _ = sl.indices(len(self))
        return SpoolRef(self.path, self.lo + a, self.lo + b)

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)[self.lo:self.hi]


def resolve_refs(pieces) -> np.ndarray:
    return np.concatenate([p.load() if isinstance(p, SpoolRef) else p for p in pieces])


def load_input(task) -> dict:
    """Load one file and cut it into clips. Runs in a worker; errors come back as text.

    With a spool folder the clip arrays are written there as ``.npy`` and only references
    travel back: the main process never copies or pickles the bulk data. ``skip_bad``: a
    sequence that fails its own checks is left out (its one-line error listed under
    ``bad_sequences``) and the file's other sequences are kept.
    """
    j, path, fmt, ref_size, image_size, views, window, stride, skip_bad, spool = task
    pos, vis, seq, start, indep = [], [], [], [], []
    n_seq, max_T, N = 0, 0, None
    bad = [] if skip_bad else None
    try:
        for s in iter_sequences(path, fmt, ref_size=ref_size, image_size=image_size, views=views, bad_sequences=bad):
            n_seq += 1
            T, n = s.vis.shape
            max_T = max(max_T, T)
            if N is None:
                N = n
            elif n != N:
                raise DataError(f"{path}: sequence {s.index} has N={n} points, earlier ones N={N}")
            st = window_starts(T, window, stride)
            if not len(st):
                continue
            idx = st[:, None] + np.arange(window)
            pos.append(np.asarray(s.pos, np.float32)[idx])
            vis.append(np.asarray(s.vis, bool)[idx])
            seq.append(np.full(len(st), s.index, np.int64))
            start.append(s.start_frame + st)
            indep.append(np.full(len(st), s.group != s.source))
    except DataError as e:
        return {"j": j, "error": one_line(e, path)}
    except (SettingError, ImportError) as e:  # a missing optional dependency is no property of the file: always fatal
        return {"j": j, "error": one_line(e, path), "fatal": True}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return {"j": j, "error": one_line(f"{type(e).__name__}: {e}", path)}
    bad = [str(e) for e in bad or ()]
    if not pos:
        why = ("no sequences" if not n_seq and not bad else
               f"every sequence is bad (first: {bad[0]})" if not n_seq else
               f"every sequence is shorter than the window (T={max_T} < {window})")
        return {"j": j, "error": f"{path}: no clips: {why}"}
    out = {"j": j, "error": None, "N": N, "sequences": n_seq, "bad_sequences": bad, "pos": np.concatenate(pos),
           "vis": np.concatenate(vis), "sequence": np.concatenate(seq), "start_frame": np.concatenate(start),
           "independent": np.concatenate(indep)}
    if spool is not None:
        C = len(out["sequence"])
        for key in ("pos", "vis"):
            p = os.path.join(spool, f"in-{j:06d}.{key}.npy")
            np.save(p, out[key], allow_pickle=False)
            out[key] = SpoolRef(p, 0, C)
    return out


def _worker_init(main_pid: int):
    exit_with_parent(main_pid)  # a killed build must not leave its workers behind
    # each worker is one core's worth of work; numba threads would oversubscribe
    import numba

    numba.set_num_threads(1)


def _numba_threads_started() -> bool:
    try:
        from numba.np.ufunc import parallel
        return bool(parallel._is_initialized)
    except (ImportError, AttributeError):
        return True


def _mp_context():
    # never plain fork: the main process may already run OpenMP threads (numba), which a
    # forked child cannot use; the fork server is started clean and preloads this module
    methods = mp.get_all_start_methods()
    if "fork" in methods and not _numba_threads_started():
        return mp.get_context("fork")  # cheapest start, safe while no numba thread exists here
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "motion_data.build.build_shards"])
        return ctx
    return mp.get_context("spawn")


def load_task(j: int, path: str, o) -> tuple:
    """``load_input``'s task for input ``j`` under build options ``o`` (``setup.Options``),
    without the spool folder (the caller appends it, or None)."""
    return (j, path, o.fmt, o.ref_size, tuple(o.image_size) if o.image_size is not None else None,
            tuple(o.views) if o.views else None, o.window, o.stride, o.on_error == "skip")


def points_error(path: str, n: int, N: int | None) -> str | None:
    """The error of an input with ``n`` points per frame after inputs with ``N`` (None: first)."""
    return None if N is None or n == N else f"{path}: N={n} points per frame, earlier inputs have N={N}"


def process_map(fn, items, workers: int):
    """``map(fn, items)`` in order, in ``workers`` build worker processes (inline for one)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_worker_init,
                             initargs=(os.getpid(),)) as ex:
        yield from ex.map(fn, items, chunksize=4)


class Runner:
    """Runs file loads (results in task order) and shard writes, inline or in a pool.

    With a pool, the main process only packs clips into shards; loading, statistics,
    histograms and tar writing all run in the workers. At most ``2 * workers`` loads and
    ``2 * workers`` shard writes are in flight, which bounds memory.
    """

    def __init__(self, workers: int, spool: Path, write_fn):
        self.write_fn = write_fn  # build.write_shard_and_record (looked up there: tests replace it)
        self.workers = max(1, int(workers))
        self.ex = None
        self.spool = None
        if self.workers > 1:
            spool.mkdir(exist_ok=True)
            self.spool = str(spool)
            self.ex = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context(),
                                          initializer=_worker_init, initargs=(os.getpid(),))
        self.writes: deque = deque()

    def loads(self, tasks):
        if self.ex is None:
            for t in tasks:
                yield load_input((*t, None))
            return
        it = ((*t, self.spool) for t in tasks)
        pending = deque(self.ex.submit(load_input, t) for _, t in zip(range(2 * self.workers), it))
        while pending:
            r = pending.popleft().result()
            t = next(it, None)
            if t is not None:
                pending.append(self.ex.submit(load_input, t))
            yield r

    def write(self, *args, done_refs=()) -> None:
        """Write a shard; spool files in ``done_refs`` are removed once it is written."""
        if self.ex is None:
            self.write_fn(*args)
            return
        self.writes.append((self.ex.submit(self.write_fn, *args), done_refs))
        while len(self.writes) > 2 * self.workers:
            self._finish_one()

    def _finish_one(self) -> None:
        fut, refs = self.writes.popleft()
        fut.result()
        for r in refs:
            os.unlink(r.path)

    def drain(self) -> None:
        while self.writes:
            self._finish_one()

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)
