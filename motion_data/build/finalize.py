"""The end of every build: ``stats.zarr``, ``manifest.parquet`` and ``build.json`` from the
shard records (one record in memory at a time), each written under a temporary name and
renamed, ``build.json`` last since its presence marks a finished build. Shared by the
one-process build (``build_shards``) and the array and Ray steps (``plan``)."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from motion_data.build import manifest as mf
from motion_data.build.records import ShardContext, add_sparse, load_record, record_clips
from motion_data.build.setup import BUILD_FORMAT, BUILD_JSON
from motion_data.build.shards import shard_name
from motion_data.build.store import PER_CLIP, STORE_NAME, StoreWriter, empty_hists, store_attrs
from motion_data.common.atomic import atomic_write_json, remove_stale
from motion_data.common.errors import DataError
from motion_data.common.static_filter import METRICS


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
