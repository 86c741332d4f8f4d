"""``merge``: join finished ``build-shards --part i/n`` outputs into one build folder, equal
in content to a single run over all inputs (the same clips in the same order, the same
statistics and histograms)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from motion_data.build import manifest as mf
from motion_data.build.finalize import write_json
from motion_data.build.setup import BUILD_FORMAT, BUILD_JSON, diff_keys, inputs_digest
from motion_data.common.errors import DataError
from motion_data.build.folder import BuildDir
from motion_data.build.shards import shard_name
from motion_data.common.static_filter import METRICS
from motion_data.build.store import PER_CLIP, REBUILD_HINT, STORE_NAME, StoreWriter, empty_hists


def _read_build_json(d: Path) -> dict:
    p = d / BUILD_JSON
    if not p.is_file():
        raise DataError(f"{d}: not a finished build (no {BUILD_JSON}; finish it by re-running its command)")
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: unreadable ({e})") from None
    if doc.get("build_format") != BUILD_FORMAT:
        raise DataError(f"{d}: a build of format {doc.get('build_format')!r}, this code reads format {BUILD_FORMAT}; "
                         f"{REBUILD_HINT}")
    return doc


@dataclass(frozen=True)
class _Parts:
    """The parts to merge, in part order (``i`` of ``--part i/n``): folders, build.json
    documents, stores and manifests; the first part's store attributes; the full input list."""
    dirs: list
    docs: list
    stores: list
    tables: list
    attrs: dict
    inputs: list


def _split_of(dirs, docs) -> int:
    """``n`` of the parts' common ``--part i/n`` split."""
    n_set = {tuple(d["part"])[1] if d.get("part") else None for d in docs}
    if None in n_set:
        bad = next(str(dd) for dd, d in zip(dirs, docs) if not d.get("part"))
        raise DataError(f"{bad}: not a --part build; merge joins the outputs of --part i/n builds")
    if len(n_set) != 1:
        raise DataError(f"parts come from different splits (n = {sorted(n_set)})")
    return n_set.pop()


def _check_same_arguments(dirs, docs) -> None:
    """Every part was built with the first one's arguments (its part aside) from as many inputs."""
    base = {k: v for k, v in docs[0]["config"].items() if k != "part"}
    for dd, d in zip(dirs[1:], docs[1:]):
        other = {k: v for k, v in d["config"].items() if k != "part"}
        if other != base or d["n_inputs_all"] != docs[0]["n_inputs_all"]:
            keys = diff_keys(base, other) or ["input list"]
            raise DataError(f"{dd}: built with different arguments than {dirs[0]} ({', '.join(keys)})")


def _part_order(docs, n: int) -> np.ndarray:
    """The order of the parts by ``i``; each of ``0..n-1`` must come exactly once."""
    idx = [d["part"][0] for d in docs]
    if len(set(idx)) != len(idx):
        raise DataError(f"part given twice: {sorted(i for i in idx if idx.count(i) > 1)}")
    missing = sorted(set(range(n)) - set(idx))
    if missing:
        raise DataError(f"parts missing: {', '.join(f'{i}/{n}' for i in missing)}")
    return np.argsort(idx)


def _all_inputs(docs) -> list:
    """The inputs of every part by global index: the full sorted input list, checked to be one."""
    inputs_all = sorted((i for d in docs for i in d["inputs"]), key=lambda i: i["global_index"])
    if [i["global_index"] for i in inputs_all] != list(range(docs[0]["n_inputs_all"])) or \
            [i.get("name", i["path"]) for i in inputs_all] != sorted(i.get("name", i["path"]) for i in inputs_all):
        raise DataError("the parts were not built from the same input list")
    return inputs_all


def _open_parts(part_dirs) -> _Parts:
    """Read and cross-check the parts' build.json, then open their stores and manifests."""
    dirs = [Path(p) for p in part_dirs]
    if not dirs:
        raise DataError("merge needs at least one part")
    docs = [_read_build_json(d) for d in dirs]
    n = _split_of(dirs, docs)
    _check_same_arguments(dirs, docs)
    order = _part_order(docs, n)
    inputs_all = _all_inputs(docs)
    dirs, docs = [dirs[i] for i in order], [docs[i] for i in order]
    builds = [BuildDir(d) for d in dirs]
    stores = [b.store for b in builds]
    tables = [b.manifest_table() for b in builds]
    a0 = dict(stores[0].attrs)
    for dd, st in zip(dirs, stores):
        if (st.attrs["N"], st.attrs["T"]) != (a0["N"], a0["T"]):
            raise DataError(f"{dd}: N={st.attrs['N']}, T={st.attrs['T']} differs from {dirs[0]} "
                             f"(N={a0['N']}, T={a0['T']})")
    return _Parts(dirs, docs, stores, tables, a0, inputs_all)


def _row_order(parts: _Parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(perm, part, row)``: the output rows as positions in the parts' concatenated rows,
    and each one's part and row there. Rows go by global input index; a part keeps its own
    row order within an input."""
    g_rows, p_rows, r_rows = [], [], []
    for p, d in enumerate(parts.docs):
        g = np.repeat([i["global_index"] for i in d["inputs"]], [i["clips"] for i in d["inputs"]]).astype(np.int64)
        if len(g) != parts.tables[p].num_rows:
            raise DataError(f"{parts.dirs[p]}: build.json counts {len(g)} clips, manifest has {parts.tables[p].num_rows}")
        g_rows.append(g)
        p_rows.append(np.full(len(g), p, np.int64))
        r_rows.append(np.arange(len(g), dtype=np.int64))
    g_all, p_all, r_all = (np.concatenate(x) for x in (g_rows, p_rows, r_rows))
    perm = np.lexsort((r_all, g_all))
    return perm, p_all[perm], r_all[perm]


def _link_shards(parts: _Parts, shards_dir: Path) -> list[dict]:
    """Hard-link (or copy) every part's shards into ``shards_dir`` under consecutive numbers
    in part order; per part ``{its shard path: the new one}``."""
    shard_map, k = [], 0
    for p, d in enumerate(parts.dirs):
        m = {}
        for s in sorted(set(parts.tables[p].column("shard").to_pylist())):
            dst = shards_dir / shard_name(k)
            try:
                os.link(d / s, dst)
            except OSError:
                shutil.copy2(d / s, dst)
            m[s] = f"shards/{shard_name(k)}"
            k += 1
        shard_map.append(m)
    return shard_map


def _write_manifest(parts: _Parts, shard_map: list[dict], perm: np.ndarray, path: Path) -> None:
    """The parts' manifests with the new shard paths, rows in output order."""
    import pyarrow as pa

    tabs = []
    for p, t in enumerate(parts.tables):
        new = pa.array([shard_map[p][s] for s in t.column("shard").to_pylist()], pa.string())
        tabs.append(t.set_column(t.schema.get_field_index("shard"), "shard", new))
    mf.write_manifest(path, pa.concat_tables(tabs).take(pa.array(perm)))


def _summed_hists(stores, W: int) -> dict:
    """The parts' class histograms added up."""
    hists = empty_hists(W)
    for st in stores:
        for m in METRICS:
            hists[m][0][...] += st[f"hist/{m}/points"][:]
            hists[m][1][...] += st[f"hist/{m}/topk"][:]
    return hists


def _write_store(parts: _Parts, src_p: np.ndarray, src_r: np.ndarray, path: Path) -> None:
    """``stats.zarr`` of the merge: per-clip rows taken from the parts in output order, the
    histograms summed."""
    a0, stores, C = parts.attrs, parts.stores, len(src_p)
    hists = _summed_hists(stores, a0["W"])
    sw = StoreWriter(path, C, a0["N"], {**a0, "n_clips": C})
    # rows of each part appear in output order, so every output block reads one
    # contiguous range per part
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


def _merged_doc(parts: _Parts, out: Path, n_clips: int, n_shards: int, t0: float) -> dict:
    """build.json of the merge (its summary under ``"summary"``)."""
    inputs, docs, dirs, a0, C = parts.inputs, parts.docs, parts.dirs, parts.attrs, n_clips
    skipped = [{"path": i["path"], "reason": i["error"]} for i in inputs if i["error"]]
    config = {**docs[0]["config"], "part": None}
    total = time.perf_counter() - t0
    summary = {"status": "merged", "out": str(out), "inputs": len(inputs),
               "inputs_used": len(inputs) - len(skipped), "skipped": skipped,
               "sequences": sum(i["sequences"] for i in inputs),
               "sequences_skipped": [m for i in inputs for m in i.get("bad_sequences", [])],
               "clips": C, "shards": n_shards, "N": a0["N"],
               "T": a0["T"], "resumed_shards": 0, "clips_this_run": C, "seconds": round(total, 3),
               "clips_per_s": round(C / total, 1) if total > 0 else None}
    return {"build_format": BUILD_FORMAT, "command": None, "config": config,
            "inputs_digest": inputs_digest([[i.get("name", i["path"]), i["size"], i.get("sha256")] for i in inputs]),
            "options": docs[0].get("options"), "part": None, "n_inputs_all": docs[0]["n_inputs_all"],
            "inputs": inputs, "summary": summary, "merged_from": [str(d) for d in dirs],
            "parts": [{"dir": str(dd), "command": d.get("command"), "summary": d.get("summary")}
                      for dd, d in zip(dirs, docs)],
            "timings": {"total_s": round(total, 3)}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def merge(parts, out, *, progress: bool = False) -> dict:
    """Join finished ``--part i/n`` builds into one build equal in content to a single run.

    Rows come in the order of the full sorted input list (as one run would write them);
    shards are hard-linked (or copied) under new consecutive numbers; statistics rows follow
    the rows, histograms are summed. ``out`` is assembled in a temporary folder and renamed.
    """
    t0 = time.perf_counter()
    opened = _open_parts(parts)
    perm, src_p, src_r = _row_order(opened)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; merge writes a new folder")
    tmp = out.with_name(f".{out.name}.merge-tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    try:
        shard_map = _link_shards(opened, tmp / "shards")
        _write_manifest(opened, shard_map, perm, tmp / mf.MANIFEST_NAME)
        _write_store(opened, src_p, src_r, tmp / STORE_NAME)
        doc = _merged_doc(opened, out, len(perm), sum(map(len, shard_map)), t0)
        write_json(tmp / BUILD_JSON, doc)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc["summary"]
