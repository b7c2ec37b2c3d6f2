"""The package's import graph: the layers are folders, imports go only downward or within a layer, no cycles.

    base     superweight/*.py    config, registry, resources, files, arguments (config imports nothing)
    core     superweight/core/   the science: params, metrics, selection, perturbation, evaluation, stats
    inputs   superweight/inputs/ models, tokenizers, data
    run      superweight/run/    the experiment recipe, validation, plan, cache, resume log
    edge     superweight/edge/   outputs, plots, figures, tracking, sweeps
    face     superweight/commands/, __main__, __init__: the command line

A module's layer is the folder it lives in; a new file is checked without editing this test. Every import
counts: module level, inside functions, relative or absolute, and `importlib.import_module` with a literal
"superweight..." string. The science core never imports wandb or plotly."""

import ast
from pathlib import Path

import pytest

from superweight.resources import result_code_files

PKG = Path(__file__).resolve().parent.parent / "superweight"
FOLDERS = ["core", "inputs", "run", "edge", "commands"]  # bottom to top, above the top-level base modules
FACE_FILES = {"__main__", "__init__"}


def layer(mod: str) -> int:
    """0 for the base modules at the top level, 1.. for each folder in FOLDERS order; the face on top."""
    head = mod.split(".")[0]
    if head in FOLDERS:
        return 1 + FOLDERS.index(head)
    return len(FOLDERS) if head in FACE_FILES or mod == "" else 0


def module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def top(mod: str) -> str:
    return mod.split(".")[0]


def imports(path: Path, pkg_root: Path = PKG) -> list[tuple[str, int, bool]]:
    """(imported superweight module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path, pkg_root).split(".")
    pkg = me if path.name == "__init__.py" else me[:-1]
    out = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(x) for f in funcs for x in ast.walk(f) if x is not f}
    for node in ast.walk(tree):
        nested = id(node) in inside
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("superweight."):
                    out.append((a.name.split(".", 1)[1], node.lineno, nested))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("superweight"):
                target = node.module[len("superweight"):].lstrip(".")
            else:
                continue
            if node.module is None or target == ".".join(base):  # `from . import x, y`
                for a in node.names:
                    out.append((".".join([*base, a.name]) if base else a.name, node.lineno, nested))
            else:
                out.append((target, node.lineno, nested))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith(("superweight", ".")):
                out.append((str(node.args[0].value).replace("superweight.", ""), node.lineno, nested))
    return [(m, ln, n) for m, ln, n in out if m]


FILES = sorted(PKG.rglob("*.py"))
EDGES = {module_name(f): imports(f) for f in FILES}


def test_every_module_lives_in_a_layer_folder():
    """Only the base modules and the face sit at the top level; every other module is inside a layer folder."""
    allowed_top = {"config", "registry", "resources", "files", "arguments", "stats", *FACE_FILES}
    stray = sorted(m for m in EDGES if "." not in m and m not in allowed_top and m not in FOLDERS)
    assert not stray, f"modules outside a layer folder: {stray}"
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(FOLDERS)


def test_no_upward_imports():
    bad = []
    for mod, edges in EDGES.items():
        for target, line, _ in edges:
            if layer(target) > layer(mod):
                bad.append(f"{mod}:{line} -> {target}")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_modules_stay_small():
    """One idea per file: no module over 400 lines."""
    big = {module_name(f): n for f in FILES if (n := len(f.read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines: {big}"


def test_result_code_covers_the_science_inputs_and_run():
    """The code version (score-cache and resume keys) hashes every module that computes results: every module
    of core/, inputs/ and run/, and every base module they reach through imports (this file's own import
    graph, EDGES), e.g. stats.py, whose interval every result row carries; nothing of the edge, the commands or
    a base module the science never imports (arguments.py: the command line)."""
    covered = {p.resolve() for p in result_code_files()}
    for folder in ("core", "inputs", "run"):
        for f in (PKG / folder).rglob("*.py"):
            assert f.resolve() in covered, f
    reached, todo = set(), [t for m, e in EDGES.items() if m.split(".")[0] in ("core", "inputs", "run") for t, _, _ in e]
    while todo:
        t = todo.pop().split(".")[0]
        if layer(t) == 0 and t not in reached and (PKG / f"{t}.py").exists():
            reached.add(t)
            todo.extend(x for x, _, _ in EDGES.get(t, []))
    assert {"config", "stats"} <= reached
    base_covered = {p.stem for p in covered if p.parent == PKG}
    assert base_covered == reached, (base_covered, reached)
    assert "arguments" not in base_covered
    assert not any("edge" in p.parts or "commands" in p.parts for p in covered)


def test_no_imports_inside_functions():
    bad = [f"{mod}:{line} -> {t}" for mod, edges in EDGES.items() for t, line, nested in edges if nested]
    assert not bad, "in-package imports inside functions (they hide the graph):\n" + "\n".join(bad)


def test_no_cycles():
    graph = {m: {t for t, _, _ in e if t in EDGES and t != m} for m, e in EDGES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_config_imports_nothing_from_the_package():
    assert EDGES["config"] == []


CORE_FILES = sorted((PKG / "core").rglob("*.py"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_science_core_never_imports_tracking_or_plotting(path):
    text = path.read_text()
    for lib in ("wandb", "plotly"):
        assert f"import {lib}" not in text and f"from {lib}" not in text


def test_the_checker_sees_what_it_claims(tmp_path):
    """The checker itself can fail: an upward import inside a function and a string import are both found,
    and an upward import is ranked above its importer (checked on a probe package in a temporary folder)."""
    pkg = tmp_path / "superweight"
    (pkg / "core").mkdir(parents=True)
    fake = pkg / "core" / "probe.py"
    fake.write_text("def f():\n    from ..edge.tracking import WandbTracker\n    import importlib\n"
                    "    importlib.import_module('superweight.edge.plots')\n")
    got = imports(fake, pkg)
    assert ("edge.tracking", 2, True) in got and ("edge.plots", 4, True) in got
    assert layer("edge.tracking") > layer(module_name(fake, pkg)) == layer("core.params")
