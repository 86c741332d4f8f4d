"""Size limits of the package code (docs/DESIGN.md "Code layout"): at most 4 exception
classes; modules of at most 400 lines; classes and functions of at most 80 lines and 8
parameters, with no exception."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("motion_data", "preprocess", "tokenizer_train")
MAX_MODULE_LINES, MAX_BODY_LINES, MAX_PARAMS, MAX_EXCEPTIONS = 400, 80, 8, 4
EXCEPTION_BASES = {"Exception", "BaseException", "KeyboardInterrupt", "ValueError", "RuntimeError", "ImportError",
                   "OSError", "TypeError", "KeyError"}


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


def test_size_limits_hold():
    got = sizes()
    assert not got, f"over the limits (module lines, part lines, or parameters): {got}"


def test_the_counters_see_what_they_count(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import x\nclass A(ValueError): pass\nclass C: pass\n")
    b.write_text("class B(A): pass\nclass D(x.KeyboardInterrupt): pass\n"
                 "def f(a, b, c, d, e, f, g, h, i):\n" + "    pass\n" * 80)
    assert exception_classes([a, b]) == ["a.py:A", "b.py:B", "b.py:D"]
    assert sizes([a, b]) == {"b.py:f": 81, "b.py:f (params)": 9}
