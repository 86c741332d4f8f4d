"""What a build is before anything is written: its options, config and input fingerprint,
and the state of its output folder (fresh, resume, done, or another build: refused).

Shared by the one-process build (``build_shards.build``) and the plan / task / finalize
steps of array builds (``plan``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from motion_data.build import manifest as mf
from motion_data.build.store import STORE_NAME
from motion_data.common.errors import DataError, SettingError
from motion_data.common.labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W, LABEL_RULES
from motion_data.common.static_filter import DEFAULT_FILTER, StaticFilter
from motion_data.common.storage import sha256_file
from motion_data.sources.importers import FORMATS, SUPPORTED_EXTS, input_root, list_inputs, source_name

BUILD_JSON = "build.json"
WORK = ".work"
PLAN_JSON = "plan.json"  # in WORK: an array build's plan (build.plan)
BUILD_FORMAT = 2  # 2: positions + visibility in the shards, checksums, label rule (store.FORMAT_VERSION)
DEFAULT_MAXCOUNT = 1000

# ------------------------------------------------------------------ config and inputs


def parse_i_of_n(value, flag: str = "--part"):
    """``(i, n)`` from ``"i/n"`` or a pair, with 0 <= i < n (None stays None); ``flag`` names
    the option in the one-line error."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            i, n = (int(x) for x in value.split("/"))
        except ValueError:
            raise SettingError(f"{flag} must look like i/n (e.g. 0/4), got {value!r}") from None
    else:
        i, n = (int(x) for x in value)
    if not (n >= 1 and 0 <= i < n):
        raise SettingError(f"{flag} i/n needs 0 <= i < n, got {i}/{n}")
    return (i, n)


def input_stat(path: str) -> list:
    """``[path, size, sha256]``: what a file is by its content, wherever it lies and whatever its mtime."""
    return [path, os.path.getsize(path), sha256_file(path)]


def inputs_digest(stats: list) -> str:
    """Digest of (name, size, sha256) of the inputs, names relative to the input root: a
    build never mixes changed inputs nor names from another root (the names are in the clip
    ids), and the same files copied to another machine or folder are the same build."""
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()


def make_config(o: "Options", part) -> dict:
    """Everything that determines the output (not workers, progress or on_error)."""
    if o.fmt != "auto" and o.fmt not in FORMATS:
        raise SettingError(f"--format must be auto or one of {', '.join(FORMATS)}, got {o.fmt!r}")
    if o.window < 2 or o.stride < 1 or o.maxcount < 1:
        raise SettingError(f"need window >= 2, stride >= 1, maxcount >= 1 (got {o.window}, {o.stride}, {o.maxcount})")
    if o.window - 1 > 255:
        raise SettingError(f"window {o.window} too long (at most 256 frames)")
    if o.W < 3 or o.W % 2 == 0:
        raise SettingError(f"--window-size must be odd and >= 3, got {o.W}")
    if not o.build_filter.enable:
        raise SettingError("the build filter must be enabled (e.g. p95@0.04)")
    if o.label_rule not in LABEL_RULES:
        raise SettingError(f"--label-rule must be one of {', '.join(LABEL_RULES)}, got {o.label_rule!r}")
    return {
        "format": o.fmt, "window": int(o.window), "stride": int(o.stride), "ref_size": int(o.ref_size), "W": int(o.W),
        "maxcount": int(o.maxcount), "part": list(part) if part else None,
        "image_size": [int(x) for x in o.image_size] if o.image_size is not None else None,
        "views": list(o.views) if o.views else None,
        "build_filter": {"metric": o.build_filter.metric, "threshold": float(o.build_filter.threshold),
                         "min_keep": int(o.build_filter.min_keep)},
        "label_rule": o.label_rule,
        # manifest source / clip ids are paths relative to the input root (importers.source_name);
        # recorded so an unfinished build of the earlier absolute naming is never resumed into a mix
        "source_names": "relative",
    }


def diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ------------------------------------------------------------------ the pipeline
# what a build writes into its folder (and the temporaries of those: ``.NAME.tmp*``/``.NAME.old*``)
BUILD_ENTRIES = (BUILD_JSON, WORK, "shards", STORE_NAME, mf.MANIFEST_NAME)
OVERWRITE_HINT = "pass --overwrite to discard it and start afresh"


def holds_build(out: Path) -> bool:
    return (out / BUILD_JSON).exists() or (out / WORK / "config.json").exists()


def remove_build(out: Path) -> None:
    """Remove a build's own entries from ``out``; other files there are left alone."""
    temp = re.compile(r"\.(%s)\.(tmp|old)\d*" % "|".join(map(re.escape, BUILD_ENTRIES)))  # atomic.temp_path
    for p in out.iterdir():
        if p.name in BUILD_ENTRIES or temp.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _prepare_out(out: Path, fingerprint: dict, force_msg, overwrite: bool = False) -> str:
    """'done' (finished, same args), 'resume' or 'fresh'; raises on a different build.
    ``overwrite``: a build found in ``out`` (finished or not) is removed: 'fresh'."""
    if overwrite and out.is_dir() and holds_build(out):
        remove_build(out)
        return "fresh"
    bj = out / BUILD_JSON
    if bj.exists():
        try:
            old = json.loads(bj.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{bj}: unreadable ({e})") from None
        prev = {"config": old.get("config"), "inputs_digest": old.get("inputs_digest")}
        if prev == fingerprint:
            return "done"
        raise DataError(f"{out} holds a finished build made with different {force_msg(prev)}; use another --out "
                         f"or {OVERWRITE_HINT}")
    cfg = out / WORK / "config.json"
    if cfg.exists():
        prev = json.loads(cfg.read_text())
        if prev != fingerprint:
            raise DataError(f"{out} holds an unfinished build made with different {force_msg(prev)}; "
                             f"re-run that command to finish it, use another --out, or {OVERWRITE_HINT}")
        return "resume"
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no build; use a new or empty --out (--overwrite replaces "
                         f"only a build)")
    return "fresh"


@dataclass(frozen=True)
class Options:
    """What determines a build's output (``make_config``) and how bad inputs are handled."""
    fmt: str = "auto"
    window: int = 16
    stride: int = 8
    ref_size: int = DEFAULT_REF_SIZE
    W: int = DEFAULT_W
    maxcount: int = DEFAULT_MAXCOUNT
    part: object = None
    on_error: str = "fail"
    image_size: object = None
    views: object = None
    build_filter: StaticFilter = field(default_factory=lambda: DEFAULT_FILTER)
    label_rule: str = DEFAULT_LABEL_RULE


@dataclass
class Prepared:
    """A build's inputs, config and fingerprint, and its output folder's state."""
    out: Path
    state: str              # fresh | resume | done
    sources: list           # this part's input paths, sorted
    names: list             # their names relative to the input root
    root: Path              # the input root
    config: dict
    fingerprint: dict       # config + inputs digest
    in_stats: list          # [path, size, sha256] per input
    global_index: list      # each input's index in the full sorted input list
    n_all: int


def prepare(inputs, out, opts: Options, overwrite: bool = False) -> Prepared:
    """List and fingerprint the inputs and check ``out`` (``_prepare_out``)."""
    if opts.on_error not in ("fail", "skip"):
        raise SettingError(f"--on-error must be fail or skip, got {opts.on_error!r}")
    part = parse_i_of_n(opts.part)
    config = make_config(opts, part)
    all_inputs = list_inputs(inputs)
    if not all_inputs:
        raise DataError(f"no input files found in {', '.join(map(str, inputs))} (looked for "
                        f"{', '.join(SUPPORTED_EXTS)}; point --input at track files or folders of them)")
    i_part, n_part = part or (0, 1)
    globals_ = list(range(i_part, len(all_inputs), n_part))
    if not globals_:
        raise SettingError(f"--part {i_part}/{n_part} gets no input: there are only {len(all_inputs)} input files")
    sources = [all_inputs[g] for g in globals_]
    # recorded names (manifest source, clip ids, split) are relative to the input root, so
    # moving the input folder leaves them unchanged
    root = input_root(inputs)
    names = [source_name(p, root) for p in sources]
    in_stats = [input_stat(p) for p in sources]
    fingerprint = {"config": config, "inputs_digest": inputs_digest([[n, *st[1:]] for st, n in zip(in_stats, names)])}

    def what_differs(prev):
        if "source_names" not in (prev.get("config") or {}):
            return "arguments (an older build-shards, which named sources by their full path)"
        keys = diff_keys(prev.get("config") or {}, config)
        if prev.get("inputs_digest") != fingerprint["inputs_digest"]:
            keys.append("inputs (files, their size or content, or their names relative to the input root)")
        return "arguments: " + ", ".join(keys or ["?"])

    out = Path(out)
    state = _prepare_out(out, fingerprint, what_differs, overwrite)
    return Prepared(out, state, sources, names, root, config, fingerprint, in_stats, globals_, len(all_inputs))
