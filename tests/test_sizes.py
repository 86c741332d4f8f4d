"""Size limits of the package code (docs/DESIGN.md "Code layout"): at most 4 exception
classes; modules of at most 400 lines; classes and functions of at most 80 lines and 8
parameters. ``OVER`` lists the parts still over a limit with their size today: it may only
shrink (a listed part that grew, or that now fits, fails, so the list stays exact)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("motion_data", "preprocess", "tokenizer_train")
MAX_MODULE_LINES, MAX_BODY_LINES, MAX_PARAMS, MAX_EXCEPTIONS = 400, 80, 8, 4
EXCEPTION_BASES = {"Exception", "BaseException", "KeyboardInterrupt", "ValueError", "RuntimeError", "ImportError",
                   "OSError", "TypeError", "KeyError"}

# part -> its size today (lines, or parameters for "(params)"); numba kernels take their arrays
# one by one (no dataclasses in nopython mode)
OVER = {
    "motion_data/build/build_shards.py:build (params)": 18,
    "motion_data/build/folder.py:BuildDir": 138,
    "motion_data/build/merge.py:merge": 136,
    "motion_data/build/stats.py:_clip_pass (params)": 16,
    "motion_data/build/stats.py:_clip_stats (params)": 20,
    "motion_data/build/stats.py:_shard_kernel (params)": 15,
    "motion_data/build/stats.py:_store_clip (params)": 14,
    "motion_data/common/label_kernels.py:_label_step (params)": 9,
    "motion_data/read/batch.py:_batch_kernel (params)": 12,
    "motion_data/read/batch.py:_derive_clip (params)": 10,
    "motion_data/read/batch.py:_derive_kernel (params)": 11,
    "motion_data/read/batch.py:make_batch (params)": 13,
    "motion_data/read/loader.py:__init__ (params)": 11,
    "motion_data/read/loader.py:make_loader (params)": 18,
    "motion_data/read/shard_reader.py:_copy_kernel (params)": 12,
    "motion_data/read/shard_reader.py:_scan_kernel (params)": 11,
    "motion_data/read/shard_reader.py:read_batch (params)": 10,
    "motion_data/sources/importers.py:_sequences (params)": 9,
    "motion_data/sources/synth.py:synth_clips": 113,
    "tokenizer_train/experiments/ablate.py:ablate (params)": 10,
    "tokenizer_train/model/model.py:MotionTokenizer": 209,
    "tokenizer_train/train/losses.py:Criterion": 100,
    "tokenizer_train/use/api.py:Tokenizer": 97,
    "tokenizer_train/use/draw.py:draw_clip (params)": 11,
    "tokenizer_train/use/draw.py:draw_compare (params)": 9,
}


def files():
    return [f for pkg in PACKAGES for f in sorted((REPO / pkg).rglob("*.py"))]


def sizes(paths=None) -> dict[str, int]:
    """Every part over a limit: ``module.py`` (lines), ``module.py:Name`` (lines) and
    ``module.py:name (params)``."""
    out = {}
    for f in paths or files():
        rel = str(f.relative_to(REPO)) if f.is_relative_to(REPO) else f.name
        text = f.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            out[rel] = n
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_BODY_LINES:
                    out[f"{rel}:{node.name}"] = lines
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                if len(params) > MAX_PARAMS:
                    out[f"{rel}:{node.name} (params)"] = len(params)
    return out


def exception_classes(paths=None) -> list[str]:
    """Classes of the package that derive (within the package or directly) from an exception."""
    found, pending = {}, []
    for f in paths or files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                pending.append((f"{f.name}:{node.name}", node.name, bases))
    names = set(EXCEPTION_BASES)
    changed = True
    while changed:  # a class is an exception when one of its bases is
        changed = False
        for where, name, bases in pending:
            if where not in found and bases & names:
                found[where] = name
                names.add(name)
                changed = True
    return sorted(found)


def test_at_most_four_exception_classes():
    got = exception_classes()
    assert len(got) <= MAX_EXCEPTIONS, f"{len(got)} exception classes: {got}"


def test_size_limits_hold_or_shrink():
    got = sizes()
    new = {k: v for k, v in got.items() if k not in OVER}
    grew = {k: (OVER[k], v) for k, v in got.items() if k in OVER and v > OVER[k]}
    fits = sorted(k for k in OVER if k not in got)
    assert not new, f"over the limits: {new}"
    assert not grew, f"grew (was, now): {grew}"
    assert not fits, f"now within the limits: remove from OVER: {fits}"


def test_the_counters_see_what_they_count(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import x\nclass A(ValueError): pass\nclass C: pass\n")
    b.write_text("class B(A): pass\nclass D(x.KeyboardInterrupt): pass\n"
                 "def f(a, b, c, d, e, f, g, h, i):\n" + "    pass\n" * 80)
    assert exception_classes([a, b]) == ["a.py:A", "b.py:B", "b.py:D"]
    assert sizes([a, b]) == {"b.py:f": 81, "b.py:f (params)": 9}
