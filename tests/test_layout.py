"""The package layout (docs/DESIGN.md "Code layout"): rooms that follow the data, imports that
only run downward, no import circle between modules."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("motion_data", "preprocess", "tokenizer_train")
# bottom first: a module may import its own room and the rooms before it, never one after it
ROOMS = ("motion_data.common", "motion_data.sources", "motion_data.build", "motion_data.read", "motion_data.inspect",
         "motion_data",
         "tokenizer_train.common", "tokenizer_train.model", "tokenizer_train.evaluate", "tokenizer_train.train",
         "tokenizer_train.use", "tokenizer_train.experiments", "tokenizer_train",
         "preprocess")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (function bodies too)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import mod` imports the module pkg.mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PACKAGES and t != name)
    return found


def room(mod: str) -> int:
    return max((i for i, r in enumerate(ROOMS) if mod == r or mod.startswith(r + ".")),
               key=lambda i: len(ROOMS[i]))


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t in imports(m, p, mods) if t in mods} for m, p in mods.items()}


def test_every_module_has_a_room():
    for m in modules():
        room(m)  # max() of nothing raises


def test_imports_run_downward():
    up = [f"{m} ({ROOMS[room(m)]}) imports {t} ({ROOMS[room(t)]})"
          for m, ts in graph().items() for t in ts if room(t) > room(m)]
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert not cycles(graph())


def test_the_checks_catch_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert room("motion_data.sources.libero.render") == ROOMS.index("motion_data.sources")
    assert room("tokenizer_train.use.api") > room("tokenizer_train.train.trainer")
    assert room("motion_data.read.loader") < room("tokenizer_train.common.config")
