"""The build-shards pipeline: track files -> shards + stats.zarr + manifest.parquet + build.json.

Flow: input files (sorted; ``part=(i, n)`` keeps every n-th) are loaded and cut into clips
by a process pool (:mod:`motion_data.build.pool`), one task per file, results consumed in
input order so the output does not depend on the worker count. The main process packs
clips into shards of ``maxcount`` (:class:`ShardPacker`); each shard's statistics, tar and
resume record are written by :func:`motion_data.build.records.write_shard_and_record`. A
re-run resumes after the last record. At the end ``stats.zarr``, ``manifest.parquet`` and
``build.json`` are written under temporary names and renamed; ``build.json`` last, since
its presence marks a finished build.
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque

import numpy as np

from motion_data.build import manifest as mf
from motion_data.build.finalize import BuildRun, finalize
from motion_data.build.setup import BUILD_JSON, PLAN_JSON, WORK, Options, prepare
from motion_data.common.atomic import atomic_write_json
from motion_data.build.pool import Runner, SpoolRef, load_task, points_error
from motion_data.common.errors import DataError
from motion_data.build.records import ShardContext, load_records, write_shard_and_record

class ShardPacker:
    """Packs the clips of consecutive inputs, in input order, into shards of ``maxcount``
    and hands each full shard to the runner with its resume cursor (the first clip not yet
    in a shard) and the inputs it finished."""

    def __init__(self, runner, ctx: ShardContext, names, prefixes, infos: dict, k: int, N, last_j: int):
        self.runner, self.ctx, self.names, self.prefixes, self.infos = runner, ctx, names, prefixes, infos
        self.k, self.N, self.last_j = k, N, last_j  # next shard number, points per clip, last input seen
        self.buf: deque = deque()      # (j, first clip index, arrays dict), oldest first
        self.buffered = 0
        self.waiting: deque = deque()  # [info, clips not yet in a shard], input order
        self.spooled: dict[int, tuple] = {}  # input -> its spool refs, removed when its last clip is written
        self.new_clips = 0

    def skip(self, j: int, err: str):
        self.waiting.append([{"j": j, "clips": 0, "sequences": 0, "error": err, "bad_sequences": []}, 0])

    def add(self, j: int, arr: dict, sequences: int, skip: int, maxcount: int, bad_sequences=()) -> int:
        """Queue input ``j``'s clips after its first ``skip`` (written before a resume); emit
        every full shard. ``bad_sequences``: errors of its sequences left out (--on-error
        skip). Returns the number of clips queued."""
        if isinstance(arr["pos"], SpoolRef):
            self.spooled[j] = (arr["pos"], arr["vis"])
        C = len(arr["sequence"])
        if skip:
            arr = {key: v[skip:] for key, v in arr.items()}
        self.waiting.append([{"j": j, "clips": C, "sequences": sequences, "error": None,
                              "bad_sequences": list(bad_sequences)}, C - skip])
        if C - skip:
            self.buf.append((j, skip, arr))
            self.buffered += C - skip
        while self.buffered >= maxcount:
            self.emit(maxcount)
        return C - skip

    def flush(self):
        if self.buffered:
            self.emit(self.buffered)
        for w in self.waiting:  # trailing inputs with no clip left to place (skipped ones)
            self.infos[w[0]["j"]] = w[0]

    def _take(self, n_take: int) -> dict:
        parts, need = [], n_take
        while need:
            j, first, arr = self.buf[0]
            n = len(arr["sequence"])
            take = min(need, n)
            parts.append({key: v[:take] for key, v in arr.items()})
            parts[-1]["input"] = np.full(take, j, np.int64)
            if take == n:
                self.buf.popleft()
            else:
                self.buf[0] = (j, first + take, {key: v[take:] for key, v in arr.items()})
            need -= take
            for w in self.waiting:
                if w[0]["j"] == j:
                    w[1] -= take
                    break
        self.buffered -= n_take
        return {key: [p[key] for p in parts] if key in ("pos", "vis") else np.concatenate([p[key] for p in parts])
                for key in parts[0]}

    def emit(self, n_take: int):
        clips = self._take(n_take)
        finished = []
        while self.waiting and self.waiting[0][1] == 0:
            finished.append(self.waiting.popleft()[0])
        if self.waiting:
            first = self.waiting[0]
            cursor = (first[0]["j"], first[0]["clips"] - first[1])
        else:
            cursor = (self.last_j + 1, 0)
        names = {int(jj): (self.names[jj], self.prefixes[jj]) for jj in np.unique(clips["input"])}
        done = [self.spooled.pop(f["j"]) for f in finished if f["j"] in self.spooled]
        self.runner.write(self.ctx, self.k, clips, names, cursor, finished, self.N,
                          done_refs=[r for pair in done for r in pair])
        for f in finished:
            self.infos[f["j"]] = f
        self.k += 1
        self.new_clips += n_take


def build(inputs, out, opts: Options = Options(), *, workers: int = 1, progress: bool = True, command=None,
          overwrite: bool = False) -> dict:
    """Build (or resume, or confirm) ``out`` with ``opts``; the summary (also in build.json).
    DataError (one line) on bad input with ``opts.on_error="fail"`` or an ``out`` holding
    another build. ``overwrite``: discard a build in ``out`` and start afresh; else an
    interrupted one resumes (an array build's plan included: its missing tasks run here)."""
    t0 = time.perf_counter()
    pre = prepare(inputs, out, opts, overwrite)
    out, state, sources, names, root, config, fingerprint = (pre.out, pre.state, pre.sources, pre.names, pre.root,
                                                              pre.config, pre.fingerprint)
    in_stats, globals_ = pre.in_stats, pre.global_index
    if state == "done":
        summary = json.loads((out / BUILD_JSON).read_text())["summary"]
        return {**summary, "status": "up-to-date"}
    work = out / WORK
    if state == "resume" and (work / PLAN_JSON).exists():
        from motion_data.build.plan import finish_here
        return finish_here(out, command, t0)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    if state == "fresh":
        atomic_write_json(work / "config.json", fingerprint)

    ctx = ShardContext(out, work, opts.W, opts.ref_size, opts.build_filter, opts.label_rule)
    prefixes = [mf.clip_prefix(x) for x in names]
    recs = load_records(work, out)
    infos: dict[int, dict] = {}
    for r in recs:
        for f in json.loads(str(r["finished"])):
            infos[f["j"]] = f
    j0, c0 = (int(x) for x in recs[-1]["cursor"]) if recs else (0, 0)
    M = len(sources)

    tasks = (load_task(j, sources[j], opts) for j in range(j0, M))
    from tqdm import tqdm
    runner = Runner(workers, work / "spool", write_shard_and_record)
    packer = ShardPacker(runner, ctx, names, prefixes, infos, k=len(recs), N=int(recs[-1]["N"]) if recs else None,
                         last_j=j0 - 1)
    bar = tqdm(total=None, unit="clip", desc="build-shards", disable=not progress, file=sys.stderr,
               initial=sum(len(r["input"]) for r in recs))
    try:
        for res in runner.loads(tasks):
            j = res["j"]
            packer.last_j = j
            err = res["error"]
            err = err or points_error(sources[j], res["N"], packer.N)
            if err is not None:
                if res.get("fatal"):
                    raise DataError(err)
                if opts.on_error == "fail":
                    raise DataError(f"{err} (--on-error skip leaves it out and resumes this build; after fixing "
                                     f"the file, re-run with --overwrite)")
                packer.skip(j, err)
                if progress:
                    bar.write(f"skipped {err}")
                continue
            packer.N = res["N"] if packer.N is None else packer.N
            arr = {key: res[key] for key in ("pos", "vis", "sequence", "start_frame", "independent")}
            if progress:
                for msg in res["bad_sequences"]:
                    bar.write(f"skipped sequence {msg}")
            bar.update(packer.add(j, arr, res["sequences"], c0 if j == j0 else 0, opts.maxcount, res["bad_sequences"]))
            bar.set_postfix(files=f"{j + 1}/{M}", shards=packer.k)
        packer.flush()
        runner.drain()
    finally:
        runner.close()
        bar.close()
    run = BuildRun(out=out, ctx=ctx, sources=sources, names=names, root=root, prefixes=prefixes, config=config, fingerprint=fingerprint,
                   in_stats=in_stats, global_index=globals_, n_all=pre.n_all, infos=infos, n_shards=packer.k,
                   command=command, on_error=opts.on_error, workers=workers, resumed=len(recs),
                   new_clips=packer.new_clips, t0=t0, t_stream=time.perf_counter() - t0)
    return finalize(run)
