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
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from motion_data.build import manifest as mf
from motion_data.build.setup import (BUILD_FORMAT, BUILD_JSON, DEFAULT_MAXCOUNT, WORK, Options,  # noqa: F401
                                     prepare)
from motion_data.common.atomic import atomic_write_json, remove_stale
from motion_data.build.pool import Runner, SpoolRef
from motion_data.common.errors import DataError
from motion_data.common.labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W
from motion_data.build.records import (ShardContext, add_sparse, load_record, load_records, record_clips,
                                       write_shard_and_record)
from motion_data.build.shards import shard_name
from motion_data.common.static_filter import METRICS, DEFAULT_FILTER, StaticFilter
from motion_data.build.store import PER_CLIP, STORE_NAME, StoreWriter, empty_hists, store_attrs

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


def build(inputs, out, *, fmt: str = "auto", window: int = 16, stride: int = 8, ref_size: int = DEFAULT_REF_SIZE,
          W: int = DEFAULT_W, workers: int = 1, maxcount: int = DEFAULT_MAXCOUNT, part=None, on_error: str = "fail",
          image_size=None, views=None, build_filter: StaticFilter = DEFAULT_FILTER, progress: bool = True,
          command=None, label_rule: str = DEFAULT_LABEL_RULE, overwrite: bool = False) -> dict:
    """Build (or resume, or confirm) ``out``; the summary (also in build.json). DataError (one
    line) on bad input with ``on_error="fail"`` or an ``out`` holding another build.
    ``overwrite``: discard a build in ``out`` and start afresh; else an interrupted one resumes
    (an array build's plan included: its missing tasks run here)."""
    t0 = time.perf_counter()
    opts = Options(fmt=fmt, window=window, stride=stride, ref_size=ref_size, W=W, maxcount=maxcount, part=part,
                   on_error=on_error, image_size=image_size, views=views, build_filter=build_filter,
                   label_rule=label_rule)
    pre = prepare(inputs, out, opts, overwrite)
    out, state, sources, names, root, config, fingerprint = (pre.out, pre.state, pre.sources, pre.names, pre.root,
                                                              pre.config, pre.fingerprint)
    in_stats, globals_ = pre.in_stats, pre.global_index
    if state == "done":
        summary = json.loads((out / BUILD_JSON).read_text())["summary"]
        return {**summary, "status": "up-to-date"}
    work = out / WORK
    if state == "resume" and (work / "plan.json").exists():
        from motion_data.build.plan import finish_here
        return finish_here(out, command, t0)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    if state == "fresh":
        atomic_write_json(work / "config.json", fingerprint)

    ctx = ShardContext(out, work, W, ref_size, build_filter, label_rule)
    prefixes = [mf.clip_prefix(x) for x in names]
    recs = load_records(work, out)
    infos: dict[int, dict] = {}
    for r in recs:
        for f in json.loads(str(r["finished"])):
            infos[f["j"]] = f
    j0, c0 = (int(x) for x in recs[-1]["cursor"]) if recs else (0, 0)
    M = len(sources)

    tasks = ((j, sources[j], fmt, ref_size, tuple(image_size) if image_size is not None else None,
              tuple(views) if views else None, window, stride, on_error == "skip") for j in range(j0, M))
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
            if err is None and packer.N is not None and res["N"] != packer.N:
                err = f"{sources[j]}: N={res['N']} points per frame, earlier inputs have N={packer.N}"
            if err is not None:
                if res.get("fatal"):
                    raise DataError(err)
                if on_error == "fail":
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
            bar.update(packer.add(j, arr, res["sequences"], c0 if j == j0 else 0, maxcount, res["bad_sequences"]))
            bar.set_postfix(files=f"{j + 1}/{M}", shards=packer.k)
        packer.flush()
        runner.drain()
    finally:
        runner.close()
        bar.close()
    run = BuildRun(out=out, ctx=ctx, sources=sources, names=names, root=root, prefixes=prefixes, config=config, fingerprint=fingerprint,
                   in_stats=in_stats, global_index=globals_, n_all=pre.n_all, infos=infos, n_shards=packer.k,
                   command=command, on_error=on_error, workers=workers, resumed=len(recs),
                   new_clips=packer.new_clips, t0=t0, t_stream=time.perf_counter() - t0)
    return finalize(run)


@dataclass
class BuildRun:
    """What ``finalize`` needs of a build whose shards are all written."""
    out: Path
    ctx: ShardContext
    sources: list           # this part's input paths, sorted by name
    names: list             # their names relative to the input root (manifest source)
    root: Path              # the input root (importers.input_root)
    prefixes: list          # their clip id prefixes
    config: dict            # make_config's output
    fingerprint: dict       # config + inputs digest
    in_stats: list          # [path, size, sha256] per input
    global_index: list      # each input's index in the full sorted input list
    n_all: int              # inputs in the full list (all parts)
    infos: dict             # input -> {clips, sequences, error}
    n_shards: int
    command: list | None
    on_error: str
    workers: int
    resumed: int            # shards found finished at the start
    new_clips: int          # clips written by this run
    t0: float
    t_stream: float


def finalize(run: BuildRun) -> dict:
    """Store, manifest and build.json from the shard records (each written whole, then renamed)."""
    out, ctx, names, prefixes, config, infos = run.out, run.ctx, run.names, run.prefixes, run.config, run.infos
    n_shards, t0, resumed = run.n_shards, run.t0, run.resumed
    work = ctx.work
    # records are streamed, one in memory at a time: their per-point arrays add up to the store's size
    if not n_shards:
        raise DataError("no clips from any input" + (" (all inputs skipped)" if infos else ""))
    first = load_record(work, out, 0)
    if first is None:
        raise DataError(f"{work}: shard record 0 is missing or broken; re-run the build to rewrite it")
    N, S = int(first["N"]), int(first["S"])
    C = sum(record_clips(work, k) for k in range(n_shards))
    attrs = store_attrs(W=ctx.W, ref_size=ctx.ref_size, T=S + 1, N=N, build_filter=config["build_filter"], n_clips=C,
                        label_rule=config["label_rule"])
    hists = empty_hists(ctx.W)
    sw = StoreWriter(out / STORE_NAME, C, N, attrs)
    man = mf.ManifestWriter(out / mf.MANIFEST_NAME)
    try:
        for kk in range(n_shards):
            r = first if kk == 0 else load_record(work, out, kk)
            if r is None:
                raise DataError(f"{work}: shard record {kk} is missing or broken (disk full or concurrent build?); "
                                f"re-run the build to rewrite it")
            sw.append({n: r[f"stat_{n}"] for n in PER_CLIP})
            for m in METRICS:
                add_sparse(hists[m][0], r[f"{m}_points_idx"], r[f"{m}_points_val"])
                add_sparse(hists[m][1], r[f"{m}_topk_idx"], r[f"{m}_topk_val"])
            man.write(_manifest_rows(r, kk, names, prefixes))
        sw.close(hists, ctx.W)
        man.close()
    except BaseException:
        sw.abort()
        man.abort()
        raise
    # leftovers of interrupted runs: shards past the end, temporary files
    keep = {shard_name(i) for i in range(n_shards)}
    for p in (out / "shards").iterdir():
        if p.name not in keep:
            p.unlink()
    inputs = []
    for j, (path, size, sha) in enumerate(run.in_stats):
        info = infos.get(j, {"clips": 0, "sequences": 0, "error": "not processed"})
        inputs.append({"path": path, "name": names[j], "global_index": run.global_index[j], "size": size, "sha256": sha,
                       "clips": int(info["clips"]), "sequences": int(info["sequences"]), "error": info["error"],
                       "bad_sequences": list(info.get("bad_sequences", []))})
    skipped = [{"path": i["path"], "reason": i["error"]} for i in inputs if i["error"]]
    total = time.perf_counter() - t0
    summary = {"status": "resumed" if resumed else "built", "out": str(out), "inputs": len(inputs),
               "inputs_used": len(inputs) - len(skipped), "skipped": skipped,
               "sequences": sum(i["sequences"] for i in inputs),
               "sequences_skipped": [m for i in inputs for m in i["bad_sequences"]], "clips": C, "shards": n_shards, "N": N,
               "T": S + 1, "resumed_shards": resumed, "clips_this_run": run.new_clips, "seconds": round(total, 3),
               "clips_per_s": round(run.new_clips / total, 1) if total > 0 else None}
    doc = {"build_format": BUILD_FORMAT, "command": run.command, "config": config,
           "inputs_digest": run.fingerprint["inputs_digest"], "options": {"on_error": run.on_error, "workers": run.workers},
           "part": config["part"], "input_root": str(run.root), "n_inputs_all": run.n_all, "inputs": inputs, "summary": summary,
           "timings": {"total_s": round(total, 3), "stream_s": round(run.t_stream, 3),
                       "finalize_s": round(total - run.t_stream, 3)},
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(out / BUILD_JSON, doc)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _manifest_rows(r: dict, k: int, names: list, prefixes: list) -> dict:
    """The manifest columns of record ``r`` (shard ``k``)."""
    src = [names[j] for j in r["input"]]
    cols = {c: r[c] for c in ("sequence", "start_frame", "offset", "size", "checksum")}
    cols.update({c: r[f"m_{c}"] for c in ("dynamic_ratio", "center_share", "mean_speed", "visible_fraction")})
    cols["source"] = src
    cols["clip_id"] = [mf.clip_id(s, q, f, prefixes[j]) for s, j, q, f in zip(src, r["input"], r["sequence"],
                                                                               r["start_frame"])]
    cols["shard"] = [f"shards/{shard_name(k)}"] * len(src)
    cols["split_group"] = [f"{s}#{q}" if ind else s for s, q, ind in zip(src, r["sequence"], r["independent"])]
    return cols


def write_json(path: Path, doc: dict) -> None:
    remove_stale(path)  # a temp left by a build killed while writing this file
    atomic_write_json(path, doc)
