"""A build in three steps for array jobs: plan, then tasks over shard ranges, then finalize.

- **plan** (``build-shards --plan-only``): every input is loaded once, in parallel, to count
  its clips (and record N, its error, its bad sequences). Shard k holds clips ``k * maxcount``
  to ``(k + 1) * maxcount`` of the inputs in order, the same rule as the one-process packer,
  so the plan is the one record of which clips go to which shard: ``.work/plan.json``.
- **task** (``--task i/n``): the i-th of n contiguous ranges of shards; each shard and its
  record are written atomically, and a shard whose record is valid is left alone, so a task
  re-run (or one run twice, on two nodes) changes nothing.
- **finalize** (``--finalize``): every record present, then ``stats.zarr``, the manifest and
  ``build.json`` from them (``build_shards.finalize``).

Tasks may run in any order, on any node that sees the output folder; the shards, manifest
and store arrays equal a one-process build of the same inputs and options.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from motion_data.build import manifest as mf
from motion_data.build.finalize import BuildRun, finalize
from motion_data.build.pool import load_input, load_task, points_error, process_map
from motion_data.build.records import ShardContext, record_ok, write_shard_and_record
from motion_data.build.setup import BUILD_JSON, PLAN_JSON, WORK, Options, input_stat, prepare
from motion_data.common.atomic import atomic_write_json
from motion_data.common.errors import DataError, SettingError
from motion_data.common.static_filter import StaticFilter

PLAN = PLAN_JSON


def count_input(task) -> dict:
    """An input's clip count, N and errors (its arrays are dropped)."""
    r = load_input((*task, None))
    return {k: r.get(k) for k in ("j", "error", "fatal", "N", "sequences", "bad_sequences")} | \
        {"clips": len(r["sequence"]) if r.get("error") is None else 0}


def shard_ranges(counts: list, maxcount: int) -> list:
    """Per shard, its ``[input, first clip, end clip]`` ranges: inputs in order, ``maxcount`` clips a shard."""
    shards, cur, room = [], [], maxcount
    for j, c in enumerate(counts):
        lo = 0
        while lo < c:
            take = min(room, c - lo)
            cur.append([j, lo, lo + take])
            lo, room = lo + take, room - take
            if room == 0:
                shards.append(cur)
                cur, room = [], maxcount
    if cur:
        shards.append(cur)
    return shards


def make_plan(inputs, out, opts: Options, workers: int = 1, overwrite: bool = False, counter=None,
              command=None) -> dict:
    """Count every input and write ``.work/plan.json`` (an existing plan of the same build is
    kept); ``{"done": summary}`` when ``out`` holds this build finished already.
    ``counter(tasks)``: the counts of the load tasks, in order (default: a local pool of
    ``workers`` processes; ``ray_exec`` passes Ray tasks). ``command``: the one-process
    command of this build, recorded in ``build.json`` by finalize."""
    pre = prepare(inputs, out, opts, overwrite)
    work = pre.out / WORK
    if pre.state == "done":
        return {"done": json.loads((pre.out / BUILD_JSON).read_text())["summary"]}
    if pre.state == "resume" and (work / PLAN).exists():
        plan = read_plan(pre.out)
        if plan["options"]["on_error"] != opts.on_error:
            raise SettingError(f"{pre.out} holds a plan made with --on-error {plan['options']['on_error']}; re-run "
                               f"with it, or plan again with --overwrite")
        return plan
    (pre.out / "shards").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    atomic_write_json(work / "config.json", pre.fingerprint)
    tasks = [load_task(j, p, opts) for j, p in enumerate(pre.sources)]
    infos, N = [], None
    for r in (counter(tasks) if counter is not None else process_map(count_input, tasks, workers)):
        err = r["error"] or points_error(pre.sources[r["j"]], r["N"], N)
        if err is not None and (r.get("fatal") or opts.on_error == "fail"):
            raise DataError(err if r.get("fatal") else f"{err} (--on-error skip leaves it out)")
        if err is None:
            N = r["N"] if N is None else N
        infos.append({"j": r["j"], "clips": r["clips"] if err is None else 0, "sequences": r["sequences"] or 0,
                      "error": err, "bad_sequences": r["bad_sequences"] or []})
    plan = {"fingerprint": pre.fingerprint, "options": {**opts.__dict__, "build_filter": opts.build_filter.__dict__},
            "sources": pre.sources, "names": pre.names, "root": str(pre.root), "in_stats": pre.in_stats,
            "global_index": pre.global_index, "n_all": pre.n_all, "N": N, "inputs": infos,
            "shards": shard_ranges([i["clips"] for i in infos], opts.maxcount), "command": command}
    if not plan["shards"]:
        raise DataError("no clips from any input" + (" (all inputs skipped)" if infos else ""))
    atomic_write_json(work / PLAN, plan)
    return plan


def read_plan(out) -> dict:
    p = Path(out) / WORK / PLAN
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SettingError(f"{p}: no plan; run build-shards with --plan-only first") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable plan ({e}); run --plan-only again with --overwrite") from None


def _options(plan: dict) -> Options:
    o = dict(plan["options"])
    return Options(**{**o, "build_filter": StaticFilter(**o["build_filter"])})


def _context(out: Path, plan: dict) -> ShardContext:
    o = _options(plan)
    return ShardContext(out, out / WORK, o.W, o.ref_size, o.build_filter, o.label_rule)


def task_shards(n_shards: int, i: int, n: int) -> range:
    """The i-th of n contiguous, near-equal ranges of shard numbers."""
    if not (n >= 1 and 0 <= i < n):
        raise SettingError(f"--task i/n needs 0 <= i < n, got {i}/{n}")
    lo, hi = (n_shards * i) // n, (n_shards * (i + 1)) // n
    return range(lo, hi)


def run_task(out, i: int, n: int) -> dict:
    """Write the shards of task i/n whose records are missing or broken; the counts."""
    out = Path(out)
    plan = read_plan(out)
    o, ctx = _options(plan), _context(out, plan)
    names = {j: (plan["names"][j], mf.clip_prefix(plan["names"][j])) for j in range(len(plan["names"]))}
    loaded: dict = {}  # the last input loaded: neighbouring shards share it
    done = written = 0
    for k in task_shards(len(plan["shards"]), i, n):
        if record_ok(ctx.work, out, k):
            done += 1
            continue
        parts = []
        for j, lo, hi in plan["shards"][k]:
            if j not in loaded:
                if input_stat(plan["sources"][j])[1:] != plan["in_stats"][j][1:]:
                    raise DataError(f"{plan['sources'][j]}: changed since the plan (size or sha256); plan again "
                                    f"with --overwrite")
                r = load_input((*load_task(j, plan["sources"][j], o), None))
                if r["error"] is not None or len(r["sequence"]) != plan["inputs"][j]["clips"]:
                    raise DataError(f"{plan['sources'][j]}: changed since the plan ({r['error'] or 'clip count'}); "
                                    f"plan again with --overwrite")
                loaded = {j: r}
            r = loaded[j]
            parts.append({key: r[key][lo:hi] for key in ("pos", "vis", "sequence", "start_frame", "independent")}
                         | {"input": np.full(hi - lo, j, np.int64)})
        clips = {key: [p[key] for p in parts] if key in ("pos", "vis") else np.concatenate([p[key] for p in parts])
                 for key in parts[0]}
        write_shard_and_record(ctx, k, clips, {j: names[j] for j in np.unique(clips["input"]).tolist()}, (0, 0), [],
                               plan["N"])
        written += 1
    return {"task": f"{i}/{n}", "shards_written": written, "shards_already_done": done}


def finish_here(out, command=None, t0: float | None = None) -> dict:
    """An array build's missing tasks in this process, then finalize (what the one-process
    command does on a planned folder)."""
    run_task(out, 0, 1)
    return finalize_plan(out, command, t0)


def finalize_plan(out, command=None, t0: float | None = None) -> dict:
    """``build_shards.finalize`` once every planned shard has its record (``command``:
    default the plan's; ``t0``: when the build started, for its timings; default now)."""
    out, t0 = Path(out), time.perf_counter() if t0 is None else t0
    if (out / BUILD_JSON).exists() and not (out / WORK / PLAN).exists():
        return {**json.loads((out / BUILD_JSON).read_text())["summary"], "status": "up-to-date"}
    plan = read_plan(out)
    command = command or plan.get("command")
    K = len(plan["shards"])
    missing = [k for k in range(K) if not record_ok(out / WORK, out, k)]
    if missing:
        raise DataError(f"{out}: {len(missing)} of {K} shards are not written yet (first: {missing[0]}); run the "
                        f"missing --task i/n steps, then --finalize again")
    names = plan["names"]
    run = BuildRun(out=out, ctx=_context(out, plan), sources=plan["sources"], names=names, root=Path(plan["root"]),
                   prefixes=[mf.clip_prefix(x) for x in names], config=plan["fingerprint"]["config"],
                   fingerprint=plan["fingerprint"], in_stats=plan["in_stats"], global_index=plan["global_index"],
                   n_all=plan["n_all"], infos={i["j"]: i for i in plan["inputs"]}, n_shards=K, command=command,
                   on_error=plan["options"]["on_error"], workers=0, resumed=0,
                   new_clips=sum(i["clips"] for i in plan["inputs"]), t0=t0, t_stream=0.0)
    return finalize(run)
