"""The build-shards pipeline: track files -> shards + stats.zarr + manifest.parquet + build.json.

Flow: input files (sorted; ``part=(i, n)`` keeps every n-th) are loaded and cut into clips
by a process pool, one task per file, results consumed in input order so the output does
not depend on the worker count. The main process packs clips into shards of ``maxcount``,
and per shard computes the per-point statistics and class histograms with the numba kernels
in one call over all its clips, writes the tar (atomic) and then a sidecar record in
``OUT/.work/`` (stats rows, manifest fields, sparse histograms, resume cursor). A re-run
resumes after the last record. At the end ``stats.zarr``, ``manifest.parquet`` and
``build.json`` are written under temporary names and renamed; ``build.json`` last, since
its presence marks a finished build.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import manifest as mf
from .atomic import atomic_open, atomic_write_json, remove_stale
from .clips import InputError
from .importers import FORMATS, iter_sequences, list_inputs
from .labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W, LABEL_RULES
from .shards import encode_sample, sample_checksum, shard_name, write_shard
from .stats import METRICS, SEED_FILTER, StaticFilter, dynamic_ratio, keep_mask, shard_stats
from .store import PER_CLIP, REBUILD_HINT, STORE_NAME, StoreWriter, empty_hists, store_attrs

BUILD_JSON = "build.json"
WORK = ".work"
BUILD_FORMAT = 2  # 2: positions + visibility in the shards, checksums, label rule (store.FORMAT_VERSION)
DEFAULT_MAXCOUNT = 1000
DEFAULT_FILTER = SEED_FILTER
# fixed member time: the same build gives byte-identical shards (any worker count, resumed or not)
SHARD_MTIME = 0


class BuildError(RuntimeError):
    """A build cannot go on; the message is one line (names the file where there is one)."""


# ------------------------------------------------------------------ config and inputs


def _parse_part(part):
    if part is None:
        return None
    if isinstance(part, str):
        try:
            i, n = (int(x) for x in part.split("/"))
        except ValueError:
            raise BuildError(f"--part must look like i/n (e.g. 0/4), got {part!r}") from None
    else:
        i, n = (int(x) for x in part)
    if not (n >= 1 and 0 <= i < n):
        raise BuildError(f"--part i/n needs 0 <= i < n, got {i}/{n}")
    return (i, n)


def _input_stat(path: str) -> list:
    st = os.stat(path)
    return [path, int(st.st_size), int(st.st_mtime_ns)]


def inputs_digest(stats: list) -> str:
    """Digest of (path, size, mtime) of the inputs: a build never mixes changed inputs."""
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()


def make_config(*, fmt, window, stride, ref_size, W, maxcount, part, image_size, views, build_filter,
                label_rule=DEFAULT_LABEL_RULE) -> dict:
    """Everything that determines the output (not workers, progress or on_error)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BuildError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if window < 2 or stride < 1 or maxcount < 1:
        raise BuildError(f"need window >= 2, stride >= 1, maxcount >= 1 (got {window}, {stride}, {maxcount})")
    if window - 1 > 255:
        raise BuildError(f"window {window} too long (at most 256 frames)")
    if W < 3 or W % 2 == 0:
        raise BuildError(f"--window-size must be odd and >= 3, got {W}")
    if not build_filter.enable:
        raise BuildError("the build filter must be enabled (e.g. p95@0.04)")
    if label_rule not in LABEL_RULES:
        raise BuildError(f"--label-rule must be one of {', '.join(LABEL_RULES)}, got {label_rule!r}")
    return {
        "format": fmt, "window": int(window), "stride": int(stride), "ref_size": int(ref_size), "W": int(W),
        "maxcount": int(maxcount), "part": list(part) if part else None,
        "image_size": [int(x) for x in image_size] if image_size is not None else None,
        "views": list(views) if views else None,
        "build_filter": {"metric": build_filter.metric, "threshold": float(build_filter.threshold),
                         "min_keep": int(build_filter.min_keep)},
        "label_rule": label_rule,
    }


def _diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ------------------------------------------------------------------ worker side


def _one_line(msg: str, path: str) -> str:
    msg = " ".join(str(msg).split())
    return msg if msg.startswith(path) else f"{path}: {msg}"


def window_starts(T: int, window: int, stride: int) -> np.ndarray:
    """First frame of each clip of a sequence of T frames (same rule as clips.cut_windows)."""
    return np.arange(0, T - window + 1, stride, dtype=np.int64) if T >= window else np.zeros(0, np.int64)


@dataclass(frozen=True)
class _Ref:
    """Clips ``lo:hi`` of a spooled ``.npy`` array (what travels instead of the data)."""

    path: str
    lo: int
    hi: int

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, sl: slice) -> "_Ref":
        a, b, _ = sl.indices(len(self))
        return _Ref(self.path, self.lo + a, self.lo + b)

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)[self.lo:self.hi]


def _resolve(pieces) -> np.ndarray:
    return np.concatenate([p.load() if isinstance(p, _Ref) else p for p in pieces])


def load_input(task) -> dict:
    """Load one file and cut it into clips. Runs in a worker; errors come back as text.

    With a spool folder the clip arrays are written there as ``.npy`` and only references
    travel back: the main process never copies or pickles the bulk data.
    """
    j, path, fmt, ref_size, image_size, views, window, stride, spool = task
    pos, vis, seq, start, indep = [], [], [], [], []
    n_seq, max_T, N = 0, 0, None
    try:
        for s in iter_sequences(path, fmt, ref_size=ref_size, image_size=image_size, views=views):
            n_seq += 1
            T, n = s.vis.shape
            max_T = max(max_T, T)
            if N is None:
                N = n
            elif n != N:
                raise InputError(f"{path}: sequence {s.index} has N={n} points, earlier ones N={N}")
            st = window_starts(T, window, stride)
            if not len(st):
                continue
            idx = st[:, None] + np.arange(window)
            pos.append(np.asarray(s.pos, np.float32)[idx])
            vis.append(np.asarray(s.vis, bool)[idx])
            seq.append(np.full(len(st), s.index, np.int64))
            start.append(s.start_frame + st)
            indep.append(np.full(len(st), s.group != s.source))
    except InputError as e:
        return {"j": j, "error": _one_line(e, path)}
    except ImportError as e:  # a missing optional dependency is no property of the file: always fatal
        return {"j": j, "error": _one_line(e, path), "fatal": True}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return {"j": j, "error": _one_line(f"{type(e).__name__}: {e}", path)}
    if not pos:
        why = "no sequences" if not n_seq else f"every sequence is shorter than the window (T={max_T} < {window})"
        return {"j": j, "error": f"{path}: no clips: {why}"}
    out = {"j": j, "error": None, "N": N, "sequences": n_seq, "pos": np.concatenate(pos),
           "vis": np.concatenate(vis), "sequence": np.concatenate(seq), "start_frame": np.concatenate(start),
           "independent": np.concatenate(indep)}
    if spool is not None:
        C = len(out["sequence"])
        for key in ("pos", "vis"):
            p = os.path.join(spool, f"in-{j:06d}.{key}.npy")
            np.save(p, out[key], allow_pickle=False)
            out[key] = _Ref(p, 0, C)
    return out


def _worker_init():
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
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


class _Runner:
    """Runs file loads (results in task order) and shard writes, inline or in a pool.

    With a pool, the main process only packs clips into shards; loading, statistics,
    histograms and tar writing all run in the workers. At most ``2 * workers`` loads and
    ``2 * workers`` shard writes are in flight, which bounds memory.
    """

    def __init__(self, workers: int, spool: Path):
        self.workers = max(1, int(workers))
        self.ex = None
        self.spool = None
        if self.workers > 1:
            spool.mkdir(exist_ok=True)
            self.spool = str(spool)
            self.ex = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context(),
                                          initializer=_worker_init)
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
            write_shard_and_record(*args)
            return
        self.writes.append((self.ex.submit(write_shard_and_record, *args), done_refs))
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


# ------------------------------------------------------------------ per-shard work


def clip_metrics(st: dict, S: int, flt: StaticFilter) -> dict:
    """Manifest figures of each clip from its per-point statistics."""
    vc = st["valid_count"].astype(np.int64)
    cc = st["center_count"].astype(np.int64)
    N = vc.shape[1]
    keep = keep_mask(st[flt.metric], st["valid_count"], flt.threshold, flt.min_keep)
    kv = (vc * keep).sum(1)
    nvalid = vc.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        center = np.where(kv > 0, (cc * keep).sum(1) / np.maximum(kv, 1), 0.0)
        speed = np.where(nvalid > 0, (st["mean"].astype(np.float64) * vc).sum(1) / np.maximum(nvalid, 1), 0.0)
    return {"dynamic_ratio": dynamic_ratio(st[flt.metric], st["valid_count"], flt),
            "center_share": center.astype(np.float32), "mean_speed": speed.astype(np.float32),
            "visible_fraction": (nvalid / float(S * N)).astype(np.float32)}


def _sparse(a: np.ndarray):
    """(flat indices, values) of the non-zero entries, indices ascending. Only rows whose
    last column (the point count) is non-zero can hold counts, so only those are scanned:
    the rank histograms are large and almost empty."""
    rows2 = a.reshape(-1, a.shape[-1])
    rows = np.flatnonzero(rows2[:, -1])
    sub = rows2[rows]
    r, c = np.nonzero(sub)
    return (rows[r] * a.shape[-1] + c).astype(np.int64), sub[r, c]


def _add_sparse(dst: np.ndarray, idx, val):
    np.add.at(dst.reshape(-1), idx, val)


def _save_npz(path: Path, **arrays):
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


@dataclass
class _Ctx:
    out: Path
    work: Path
    W: int
    ref_size: int
    flt: StaticFilter
    label_rule: str = DEFAULT_LABEL_RULE


def write_shard_and_record(ctx: _Ctx, k: int, clips: dict, names: dict, cursor, finished: list, N: int) -> int:
    """Stats + histograms over the shard's clips (one kernel call each), tar, then record.

    ``names`` maps the shard's input indices to ``(path, clip id prefix)``.
    """
    pos, vis = _resolve(clips["pos"]), _resolve(clips["vis"])
    C, S = vis.shape[0], vis.shape[1] - 1
    # statistics and all histograms in one pass
    st, hists = shard_stats(pos, vis, ctx.W, ctx.ref_size, ctx.label_rule)
    stats3 = np.stack([st[m] for m in METRICS], axis=1)  # (C, 3, N)
    samples = []
    for i in range(C):
        j, sq, sf = int(clips["input"][i]), int(clips["sequence"][i]), int(clips["start_frame"][i])
        src, prefix = names[j]
        cid = mf.clip_id(src, sq, sf, prefix)
        meta = {"source": src, "sequence": sq, "start_frame": sf, "ref_size": ctx.ref_size, "W": ctx.W,
                "label_rule": ctx.label_rule}
        samples.append(encode_sample(cid, pos[i], vis[i], stats3[i], meta))
    checksum = np.array([sample_checksum(x) for x in samples], np.int64)
    index = write_shard(ctx.out / "shards" / shard_name(k), samples, mtime=SHARD_MTIME)
    hist = {}
    for m in METRICS:
        points, topk = hists[m]
        hist[f"{m}_points_idx"], hist[f"{m}_points_val"] = _sparse(points)
        hist[f"{m}_topk_idx"], hist[f"{m}_topk_val"] = _sparse(topk)
    met = clip_metrics(st, S, ctx.flt)
    _save_npz(ctx.work / f"rec-{k:06d}.npz",
              **{f"stat_{n}": st[n] for n in PER_CLIP}, **{f"m_{n}": v for n, v in met.items()}, **hist,
              input=clips["input"], sequence=clips["sequence"], start_frame=clips["start_frame"],
              independent=clips["independent"], checksum=checksum,
              offset=np.array([o for _, o, _ in index], np.int64), size=np.array([s for _, _, s in index], np.int64),
              cursor=np.array(cursor, np.int64), N=np.array(N), S=np.array(S),
              shard_bytes=np.array(os.path.getsize(ctx.out / "shards" / shard_name(k))),
              finished=np.array(json.dumps(finished)))
    return C


def _load_records(work: Path, out: Path) -> list[dict]:
    """Consecutive valid records from 0; the first broken one (or missing shard) ends the list."""
    recs = []
    k = 0
    while True:
        p = work / f"rec-{k:06d}.npz"
        if not p.exists():
            break
        try:
            with np.load(p, allow_pickle=False) as z:
                r = {key: z[key] for key in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            break
        shard = out / "shards" / shard_name(k)
        if not shard.is_file() or shard.stat().st_size != int(r["shard_bytes"]):
            break
        recs.append(r)
        k += 1
    # later records are not trusted once one is missing: their shards are rewritten
    for p in work.glob("rec-*.npz"):
        if int(p.stem.split("-")[1]) >= k:
            p.unlink()
    return recs


# ------------------------------------------------------------------ the pipeline


def _prepare_out(out: Path, fingerprint: dict, force_msg: str) -> str:
    """'done' (finished, same args), 'resume' or 'fresh'; raises on a different build."""
    bj = out / BUILD_JSON
    if bj.exists():
        try:
            old = json.loads(bj.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BuildError(f"{bj}: unreadable ({e})") from None
        prev = {"config": old.get("config"), "inputs_digest": old.get("inputs_digest")}
        if prev == fingerprint:
            return "done"
        raise BuildError(f"{out} holds a finished build made with different {force_msg(prev)}; use another --out")
    cfg = out / WORK / "config.json"
    if cfg.exists():
        prev = json.loads(cfg.read_text())
        if prev != fingerprint:
            raise BuildError(f"{out} holds an unfinished build made with different {force_msg(prev)}; "
                             f"re-run that command to finish it or use another --out")
        return "resume"
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty and holds no build; use a new or empty --out")
    return "fresh"


def build(inputs, out, *, fmt: str = "auto", window: int = 16, stride: int = 8, ref_size: int = DEFAULT_REF_SIZE,
          W: int = DEFAULT_W, workers: int = 1, maxcount: int = DEFAULT_MAXCOUNT, part=None, on_error: str = "fail",
          image_size=None, views=None, build_filter: StaticFilter = DEFAULT_FILTER, progress: bool = True,
          command=None, label_rule: str = DEFAULT_LABEL_RULE) -> dict:
    """Build (or resume, or confirm) ``out``; returns the summary dict (also in build.json).

    Raises BuildError with a one-line message on bad input (``on_error="fail"``) or an
    ``out`` that holds a different build.
    """
    t0 = time.perf_counter()
    if on_error not in ("fail", "skip"):
        raise BuildError(f"--on-error must be fail or skip, got {on_error!r}")
    part = _parse_part(part)
    config = make_config(fmt=fmt, window=window, stride=stride, ref_size=ref_size, W=W, maxcount=maxcount,
                         part=part, image_size=image_size, views=views, build_filter=build_filter,
                         label_rule=label_rule)
    try:
        all_inputs = list_inputs(inputs)
    except InputError as e:
        raise BuildError(str(e)) from None
    if not all_inputs:
        raise BuildError(f"no input files found in {', '.join(map(str, inputs))}")
    i_part, n_part = part or (0, 1)
    globals_ = list(range(i_part, len(all_inputs), n_part))
    if not globals_:
        raise BuildError(f"--part {i_part}/{n_part} gets no input: there are only {len(all_inputs)} input files")
    sources = [all_inputs[g] for g in globals_]
    in_stats = [_input_stat(p) for p in sources]
    fingerprint = {"config": config, "inputs_digest": inputs_digest(in_stats)}
    out = Path(out)

    def what_differs(prev):
        keys = _diff_keys(prev.get("config") or {}, config)
        if prev.get("inputs_digest") != fingerprint["inputs_digest"]:
            keys.append("inputs (files or their size/mtime)")
        return "arguments: " + ", ".join(keys or ["?"])

    state = _prepare_out(out, fingerprint, what_differs)
    if state == "done":
        summary = json.loads((out / BUILD_JSON).read_text())["summary"]
        return {**summary, "status": "up-to-date"}
    work = out / WORK
    (out / "shards").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    if state == "fresh":
        atomic_write_json(work / "config.json", fingerprint)

    ctx = _Ctx(out, work, W, ref_size, build_filter, label_rule)
    prefixes = [mf.clip_prefix(x) for x in sources]
    recs = _load_records(work, out)
    infos: dict[int, dict] = {}
    for r in recs:
        for f in json.loads(str(r["finished"])):
            infos[f["j"]] = f
    N = int(recs[-1]["N"]) if recs else None
    j0, c0 = (int(x) for x in recs[-1]["cursor"]) if recs else (0, 0)
    k = len(recs)
    resumed = k
    M = len(sources)

    tasks = ((j, sources[j], fmt, ref_size, tuple(image_size) if image_size is not None else None,
              tuple(views) if views else None, window, stride) for j in range(j0, M))
    from tqdm import tqdm
    runner = _Runner(workers, work / "spool")
    spooled: dict[int, tuple] = {}  # input -> its spool refs, removed when its last clip is written
    bar = tqdm(total=None, unit="clip", desc="build-shards", disable=not progress, file=sys.stderr,
               initial=sum(len(r["input"]) for r in recs))
    buf: deque = deque()          # (j, first clip index, arrays dict), oldest first
    buffered = 0
    waiting: deque = deque()      # [info, clips not yet in a shard], input order
    new_clips = 0

    def emit(n_take: int):
        nonlocal buffered, k, new_clips
        parts, need = [], n_take
        while need:
            j, first, arr = buf[0]
            n = len(arr["sequence"])
            take = min(need, n)
            parts.append({key: v[:take] for key, v in arr.items()})
            parts[-1]["input"] = np.full(take, j, np.int64)
            if take == n:
                buf.popleft()
            else:
                buf[0] = (j, first + take, {key: v[take:] for key, v in arr.items()})
            need -= take
            for w in waiting:
                if w[0]["j"] == j:
                    w[1] -= take
                    break
        clips = {key: [p[key] for p in parts] if key in ("pos", "vis") else np.concatenate([p[key] for p in parts])
                 for key in parts[0]}
        buffered -= n_take
        finished = []
        while waiting and waiting[0][1] == 0:
            finished.append(waiting.popleft()[0])
        if waiting:
            jf = waiting[0][0]["j"]
            cursor = (jf, waiting[0][0]["clips"] - waiting[0][1])
        else:
            cursor = (last_j + 1, 0)
        names = {int(jj): (sources[jj], prefixes[jj]) for jj in np.unique(clips["input"])}
        done = [spooled.pop(f["j"]) for f in finished if f["j"] in spooled]
        runner.write(ctx, k, clips, names, cursor, finished, N, done_refs=[r for pair in done for r in pair])
        for f in finished:
            infos[f["j"]] = f
        k += 1
        new_clips += n_take

    last_j = j0 - 1
    try:
        for res in runner.loads(tasks):
            j = res["j"]
            last_j = j
            err = res["error"]
            if err is None and N is not None and res["N"] != N:
                err = f"{sources[j]}: N={res['N']} points per frame, earlier inputs have N={N}"
            if err is not None:
                if on_error == "fail" or res.get("fatal"):
                    raise BuildError(err)
                waiting.append([{"j": j, "clips": 0, "sequences": 0, "error": err}, 0])
                if progress:
                    bar.write(f"skipped {err}")
                continue
            N = res["N"] if N is None else N
            arr = {key: res[key] for key in ("pos", "vis", "sequence", "start_frame", "independent")}
            if isinstance(arr["pos"], _Ref):
                spooled[j] = (arr["pos"], arr["vis"])
            C = len(arr["sequence"])
            skip = c0 if j == j0 else 0
            if skip:
                arr = {key: v[skip:] for key, v in arr.items()}
            waiting.append([{"j": j, "clips": C, "sequences": res["sequences"], "error": None}, C - skip])
            if C - skip:
                buf.append((j, skip, arr))
                buffered += C - skip
            bar.update(C - skip)
            bar.set_postfix(files=f"{j + 1}/{M}", shards=k)
            while buffered >= maxcount:
                emit(maxcount)
        if buffered:
            emit(buffered)
        runner.drain()
    finally:
        runner.close()
        bar.close()
    for w in waiting:  # trailing inputs with no clip left to place (skipped ones)
        infos[w[0]["j"]] = w[0]
    t_stream = time.perf_counter() - t0
    summary = finalize(out, ctx, sources, prefixes, config, fingerprint, in_stats, globals_, len(all_inputs), infos, k,
                       command,
                       on_error=on_error, workers=workers, resumed=resumed, new_clips=new_clips, t0=t0,
                       t_stream=t_stream)
    return summary


def finalize(out: Path, ctx: _Ctx, sources, prefixes, config, fingerprint, in_stats, globals_, n_all, infos,
             n_shards, command, *,
             on_error, workers, resumed, new_clips, t0, t_stream) -> dict:
    work = ctx.work
    recs = _load_records(work, out)
    if len(recs) != n_shards:
        raise BuildError(f"{work}: expected {n_shards} shard records, found {len(recs)} (disk full or concurrent build?)")
    if not recs:
        raise BuildError("no clips from any input" + (" (all inputs skipped)" if infos else ""))
    N, S = int(recs[0]["N"]), int(recs[0]["S"])
    C = sum(len(r["input"]) for r in recs)
    attrs = store_attrs(W=ctx.W, ref_size=ctx.ref_size, T=S + 1, N=N, build_filter=config["build_filter"], n_clips=C,
                        label_rule=config["label_rule"])
    hists = empty_hists(ctx.W)
    sw = StoreWriter(out / STORE_NAME, C, N, attrs)
    cols = {c: [] for c in mf.COLUMNS}
    try:
        for kk, r in enumerate(recs):
            sw.append({n: r[f"stat_{n}"] for n in PER_CLIP})
            for m in METRICS:
                _add_sparse(hists[m][0], r[f"{m}_points_idx"], r[f"{m}_points_val"])
                _add_sparse(hists[m][1], r[f"{m}_topk_idx"], r[f"{m}_topk_val"])
            src = [sources[j] for j in r["input"]]
            cols["source"] += src
            cols["clip_id"] += [mf.clip_id(s, q, f, prefixes[j])
                                for s, j, q, f in zip(src, r["input"], r["sequence"], r["start_frame"])]
            cols["shard"] += [f"shards/{shard_name(kk)}"] * len(src)
            cols["split_group"] += [f"{s}#{q}" if ind else s for s, q, ind in zip(src, r["sequence"], r["independent"])]
            for c in ("sequence", "start_frame", "offset", "size", "checksum"):
                cols[c].append(r[c])
            for c in ("dynamic_ratio", "center_share", "mean_speed", "visible_fraction"):
                cols[c].append(r[f"m_{c}"])
        for c in ("sequence", "start_frame", "offset", "size", "checksum", "dynamic_ratio", "center_share",
                  "mean_speed", "visible_fraction"):
            cols[c] = np.concatenate(cols[c])
        sw.close(hists, ctx.W)
    except BaseException:
        sw.abort()
        raise
    mf.write_manifest(out / mf.MANIFEST_NAME, cols)
    # leftovers of interrupted runs: shards past the end, temporary files
    keep = {shard_name(i) for i in range(n_shards)}
    for p in (out / "shards").iterdir():
        if p.name not in keep:
            p.unlink()
    inputs = []
    for j, (path, size, mtime) in enumerate(in_stats):
        info = infos.get(j, {"clips": 0, "sequences": 0, "error": "not processed"})
        inputs.append({"path": path, "global_index": globals_[j], "size": size, "mtime_ns": mtime,
                       "clips": int(info["clips"]), "sequences": int(info["sequences"]), "error": info["error"]})
    skipped = [{"path": i["path"], "reason": i["error"]} for i in inputs if i["error"]]
    total = time.perf_counter() - t0
    summary = {"status": "resumed" if resumed else "built", "out": str(out), "inputs": len(inputs),
               "inputs_used": len(inputs) - len(skipped), "skipped": skipped,
               "sequences": sum(i["sequences"] for i in inputs), "clips": C, "shards": n_shards, "N": N,
               "T": S + 1, "resumed_shards": resumed, "clips_this_run": new_clips, "seconds": round(total, 3),
               "clips_per_s": round(new_clips / total, 1) if total > 0 else None}
    doc = {"build_format": BUILD_FORMAT, "command": command, "config": config,
           "inputs_digest": fingerprint["inputs_digest"], "options": {"on_error": on_error, "workers": workers},
           "part": config["part"], "n_inputs_all": n_all, "inputs": inputs, "summary": summary,
           "timings": {"total_s": round(total, 3), "stream_s": round(t_stream, 3),
                       "finalize_s": round(total - t_stream, 3)},
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(out / BUILD_JSON, doc)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def write_json(path: Path, doc: dict) -> None:
    remove_stale(path)  # a temp left by a build killed while writing this file
    atomic_write_json(path, doc)


def format_summary(s: dict) -> str:
    if s["status"] == "up-to-date":
        return f"{s['out']}: build already complete ({s['clips']} clips in {s['shards']} shards); nothing to do"
    lines = [f"{s['out']}: {s['status']}: {s['clips']} clips (N={s['N']}, T={s['T']}) in {s['shards']} shards "
             f"from {s['inputs_used']}/{s['inputs']} inputs, {s['sequences']} sequences"]
    if s.get("resumed_shards"):
        lines.append(f"  resumed after {s['resumed_shards']} finished shards")
    if s.get("seconds") is not None:
        lines.append(f"  {s['clips_this_run']} clips this run in {s['seconds']:.2f} s ({s['clips_per_s']} clips/s)")
    if s["skipped"]:
        lines.append(f"  skipped {len(s['skipped'])} inputs:")
        lines += [f"    {x['reason']}" for x in s["skipped"]]
    return "\n".join(lines)


# ------------------------------------------------------------------ merge


def _read_build_json(d: Path) -> dict:
    p = d / BUILD_JSON
    if not p.is_file():
        raise BuildError(f"{d}: not a finished build (no {BUILD_JSON}; finish it by re-running its command)")
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{p}: unreadable ({e})") from None
    if doc.get("build_format") != BUILD_FORMAT:
        raise BuildError(f"{d}: a build of format {doc.get('build_format')!r}, this code reads format {BUILD_FORMAT}; "
                         f"{REBUILD_HINT}")
    return doc


def merge(parts, out, *, progress: bool = False) -> dict:
    """Join finished ``--part i/n`` builds into one build equal in content to a single run.

    Rows come in the order of the full sorted input list (as one run would write them);
    shards are hard-linked (or copied) under new consecutive numbers; statistics rows follow
    the rows, histograms are summed. ``out`` is assembled in a temporary folder and renamed.
    """
    from .store import open_store
    import pyarrow as pa

    t0 = time.perf_counter()
    dirs = [Path(p) for p in parts]
    if not dirs:
        raise BuildError("merge needs at least one part")
    docs = [_read_build_json(d) for d in dirs]
    n_set = {tuple(d["part"])[1] if d.get("part") else None for d in docs}
    if None in n_set:
        bad = next(str(dd) for dd, d in zip(dirs, docs) if not d.get("part"))
        raise BuildError(f"{bad}: not a --part build; merge joins the outputs of --part i/n builds")
    if len(n_set) != 1:
        raise BuildError(f"parts come from different splits (n = {sorted(n_set)})")
    n = n_set.pop()
    base = {k: v for k, v in docs[0]["config"].items() if k != "part"}
    for dd, d in zip(dirs[1:], docs[1:]):
        other = {k: v for k, v in d["config"].items() if k != "part"}
        if other != base or d["n_inputs_all"] != docs[0]["n_inputs_all"]:
            keys = _diff_keys(base, other) or ["input list"]
            raise BuildError(f"{dd}: built with different arguments than {dirs[0]} ({', '.join(keys)})")
    idx = [d["part"][0] for d in docs]
    if len(set(idx)) != len(idx):
        raise BuildError(f"part given twice: {sorted(i for i in idx if idx.count(i) > 1)}")
    missing = sorted(set(range(n)) - set(idx))
    if missing:
        raise BuildError(f"parts missing: {', '.join(f'{i}/{n}' for i in missing)}")
    order = np.argsort(idx)
    inputs_all = sorted((i for d in docs for i in d["inputs"]), key=lambda i: i["global_index"])
    if [i["global_index"] for i in inputs_all] != list(range(docs[0]["n_inputs_all"])) or \
            [i["path"] for i in inputs_all] != sorted(i["path"] for i in inputs_all):
        raise BuildError("the parts were not built from the same input list")
    dirs, docs = [dirs[i] for i in order], [docs[i] for i in order]
    stores = [open_store(d / STORE_NAME) for d in dirs]
    tables = [mf.read_manifest(d, build_dir=d) for d in dirs]
    a0 = dict(stores[0].attrs)
    for dd, st in zip(dirs, stores):
        if (st.attrs["N"], st.attrs["T"]) != (a0["N"], a0["T"]):
            raise BuildError(f"{dd}: N={st.attrs['N']}, T={st.attrs['T']} differs from {dirs[0]} "
                             f"(N={a0['N']}, T={a0['T']})")

    # global row order: by global input index; a part keeps its own row order within an input
    g_rows, p_rows, r_rows = [], [], []
    for p, d in enumerate(docs):
        g = np.repeat([i["global_index"] for i in d["inputs"]], [i["clips"] for i in d["inputs"]]).astype(np.int64)
        if len(g) != tables[p].num_rows:
            raise BuildError(f"{dirs[p]}: build.json counts {len(g)} clips, manifest has {tables[p].num_rows}")
        g_rows.append(g)
        p_rows.append(np.full(len(g), p, np.int64))
        r_rows.append(np.arange(len(g), dtype=np.int64))
    g_all, p_all, r_all = (np.concatenate(x) for x in (g_rows, p_rows, r_rows))
    perm = np.lexsort((r_all, g_all))
    C = len(perm)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} exists and is not empty; merge writes a new folder")
    tmp = out.with_name(f".{out.name}.merge-tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    try:
        # shards: part order, consecutive numbers
        shard_map, k = [], 0
        for p, d in enumerate(dirs):
            names = sorted(set(tables[p].column("shard").to_pylist()))
            m = {}
            for s in names:
                dst = tmp / "shards" / shard_name(k)
                try:
                    os.link(d / s, dst)
                except OSError:
                    shutil.copy2(d / s, dst)
                m[s] = f"shards/{shard_name(k)}"
                k += 1
            shard_map.append(m)
        tabs = []
        for p, t in enumerate(tables):
            new = pa.array([shard_map[p][s] for s in t.column("shard").to_pylist()], pa.string())
            tabs.append(t.set_column(t.schema.get_field_index("shard"), "shard", new))
        table = pa.concat_tables(tabs).take(pa.array(perm))
        mf.write_manifest(tmp / mf.MANIFEST_NAME, table)

        hists = empty_hists(a0["W"])
        for st in stores:
            for m in METRICS:
                hists[m][0][...] += st[f"hist/{m}/points"][:]
                hists[m][1][...] += st[f"hist/{m}/topk"][:]
        sw = StoreWriter(tmp / STORE_NAME, C, a0["N"], {**a0, "n_clips": C})
        # rows of each part appear in output order, so every output block reads one
        # contiguous range per part
        src_p, src_r = p_all[perm], r_all[perm]
        block = 8192
        for a in range(0, C, block):
            bp, br = src_p[a:a + block], src_r[a:a + block]
            rows = {name: np.empty((len(bp), a0["N"]), stores[0][f"stats/{name}"].dtype) for name in PER_CLIP}
            for p in np.unique(bp):
                sel = bp == p
                lo, hi = int(br[sel].min()), int(br[sel].max()) + 1
                for name in PER_CLIP:
                    rows[name][sel] = stores[p][f"stats/{name}"][lo:hi][br[sel] - lo]
            sw.append(rows)
        sw.close(hists, a0["W"])

        inputs = inputs_all
        skipped = [{"path": i["path"], "reason": i["error"]} for i in inputs if i["error"]]
        config = {**docs[0]["config"], "part": None}
        total = time.perf_counter() - t0
        summary = {"status": "merged", "out": str(out), "inputs": len(inputs),
                   "inputs_used": len(inputs) - len(skipped), "skipped": skipped,
                   "sequences": sum(i["sequences"] for i in inputs), "clips": C, "shards": k, "N": a0["N"],
                   "T": a0["T"], "resumed_shards": 0, "clips_this_run": C, "seconds": round(total, 3),
                   "clips_per_s": round(C / total, 1) if total > 0 else None}
        doc = {"build_format": BUILD_FORMAT, "command": None, "config": config,
               "inputs_digest": inputs_digest([[i["path"], i["size"], i["mtime_ns"]] for i in inputs]),
               "options": docs[0].get("options"), "part": None, "n_inputs_all": docs[0]["n_inputs_all"],
               "inputs": inputs, "summary": summary, "merged_from": [str(d) for d in dirs],
               "parts": [{"dir": str(dd), "command": d.get("command"), "summary": d.get("summary")}
                         for dd, d in zip(dirs, docs)],
               "timings": {"total_s": round(total, 3)}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(tmp / BUILD_JSON, doc)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
