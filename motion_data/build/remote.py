"""build-shards with inputs or output in object storage: stage, build, publish.

Remote inputs (``s3://bucket/tracks/``) are copied into a local staging folder under the
same names relative to their root, so the build (clip ids, manifest sources, split) is the
one a local copy of the same tree gives; a copy already there with the same size is kept
(a re-run resumes). A remote ``--out`` is built in the staging folder, then published one
object per file, each a single PUT (atomic on object storage), ``build.json`` last: a build
whose ``build.json`` is there is whole. A re-run of a published build (the same build config)
publishes nothing; another command refuses unless ``--overwrite``. The staging folder needs the inputs' and the build's
size on local disk (``--stage DIR``; default: the system's temporary folder).

This is a first, one-machine step: the cluster build is "plan, execute, finalize"
(docs/DESIGN.md), which writes each shard straight to storage.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from tqdm import tqdm

from motion_data.common.errors import DataError, SettingError
from motion_data.common.storage import Url, is_url, location
from motion_data.sources.importers import SUPPORTED_EXTS

BUILD_JSON = "build.json"


def stage_root(out, inputs, stage=None) -> Path:
    """The staging folder of one (out, inputs) pair: its own folder under ``stage``."""
    key = hashlib.sha256(repr((str(out), sorted(map(str, inputs)))).encode()).hexdigest()[:16]
    return Path(stage or Path(tempfile.gettempdir()) / "motion_data-stage") / key


def fetch_inputs(inputs, dest: Path, progress: bool = True) -> list[str]:
    """Local paths for ``inputs``: local ones as given, remote files and prefixes copied
    under ``dest`` (supported track files only, names relative to each prefix kept)."""
    out = []
    for i, raw in enumerate(inputs):
        if not is_url(raw):
            out.append(str(raw))
            continue
        u = location(raw)
        fs = u.fs
        try:
            is_dir = fs.isdir(u.path)
            if is_dir:
                files = sorted(f for f in fs.find(u.path) if f.lower().endswith(SUPPORTED_EXTS))
                base, root = u.path.rstrip("/"), dest / f"in{i}" / u.name
            elif fs.isfile(u.path):
                files, base, root = [u.path], u.parent.path.rstrip("/"), dest / f"in{i}"
            else:
                raise DataError(f"{u}: no such file or prefix; check the URL and the credentials")
            for f in tqdm(files, desc=f"fetch {u.name}", unit="file", disable=not progress):
                local = root / f[len(base):].lstrip("/")
                if not (local.is_file() and local.stat().st_size == fs.size(f)):
                    local.parent.mkdir(parents=True, exist_ok=True)
                    tmp = local.with_name(local.name + ".part")
                    fs.get_file(f, str(tmp))
                    tmp.replace(local)
        except (OSError, ValueError) as e:
            raise DataError(f"{u}: cannot fetch the inputs ({type(e).__name__}: {e})") from None
        out.append(str(root if is_dir else root / u.name))
    return out


def check_out(out: Url, local: Path, overwrite: bool) -> bool:
    """After the staged build in ``local``: whether ``out`` already holds it (the same build
    config in its build.json: nothing to publish). Another finished build there is refused
    unless ``overwrite``, which first removes what a build writes."""
    marker = out / BUILD_JSON
    if not marker.exists():
        return False
    try:
        same = json.loads(marker.read_bytes())["config"] == json.loads((local / BUILD_JSON).read_bytes())["config"]
    except (ValueError, KeyError, OSError):
        same = False
    if same and not overwrite:
        return True
    if not overwrite:
        raise SettingError(f"{out}: holds a finished build made with other arguments (build.json); use another "
                           f"--out or pass --overwrite to replace it")
    for name in ("shards", "stats.zarr", "manifest.parquet", BUILD_JSON):
        p = out / name
        if p.exists():
            p.fs.rm(p.path, recursive=True)
    return False


def publish(local: Path, out: Url, progress: bool = True) -> None:
    """Upload the finished build in ``local`` to ``out``, one PUT per file, build.json last;
    files already there with the same size are kept (an interrupted publish resumes)."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != BUILD_JSON and ".tmp" not in p.name)
    fs = out.fs
    for p in tqdm(files + [local / BUILD_JSON], desc=f"publish {out}", unit="file", disable=not progress):
        dst = out / p.relative_to(local).as_posix()
        try:
            if p.name != BUILD_JSON and fs.exists(dst.path) and fs.size(dst.path) == p.stat().st_size:
                continue
            fs.put_file(str(p), dst.path)
        except (OSError, ValueError) as e:
            raise DataError(f"{dst}: cannot upload ({type(e).__name__}: {e}); re-run the same command to resume "
                            f"(the build is complete in {local})") from None
