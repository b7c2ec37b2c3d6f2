"""The package's import graph: five layers, imports only downward or within a layer, no cycles.

    base    config, registry, resources, io, arguments          (config imports nothing from the package)
    core    params, experts, outliers, hutchinson, metrics, selection, perturbation, evaluation, results
    inputs  models, gguf_tokenizer, data
    loop    validation, cache, progress, experiment, memory
    edge    manifest, outputs, plots, tracking, sweep, figures
    face    commands.*, __main__, __init__

Every import counts: module level, inside functions, relative or absolute, and `importlib.import_module`
with a literal "superweight..." string. The science core never imports wandb or plotly."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "superweight"
LAYERS = {
    "base": ["config", "registry", "resources", "io", "arguments"],
    "core": ["params", "experts", "outliers", "hutchinson", "metrics", "selection", "perturbation", "evaluation", "results"],
    "inputs": ["models", "gguf_tokenizer", "data"],
    "loop": ["validation", "cache", "progress", "experiment", "memory"],
    "edge": ["manifest", "outputs", "plots", "tracking", "sweep", "figures"],
    "face": ["commands", "__main__", "__init__"],
}
RANK = {m: i for i, (_, mods) in enumerate(LAYERS.items()) for m in mods}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def top(mod: str) -> str:
    return mod.split(".")[0]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported superweight module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path).split(".")
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


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in EDGES} - set(RANK))
    assert not missing, f"modules without a layer (add them to LAYERS): {missing}"


def test_no_upward_imports():
    bad = []
    for mod, edges in EDGES.items():
        for target, line, _ in edges:
            if target.startswith("commands") and top(mod) == "commands":
                continue
            if RANK[top(target)] > RANK[top(mod)]:
                bad.append(f"{mod}:{line} -> {target}")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


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


@pytest.mark.parametrize("mod", LAYERS["core"])
def test_science_core_never_imports_tracking_or_plotting(mod):
    text = (PKG / f"{mod}.py").read_text()
    for lib in ("wandb", "plotly"):
        assert f"import {lib}" not in text and f"from {lib}" not in text


def test_the_checker_sees_what_it_claims():
    """The checker itself can fail: an upward import inside a function and a string import are both found."""
    fake = PKG / "_structure_probe.py"
    fake.write_text("def f():\n    from .tracking import WandbTracker\n    import importlib\n"
                    "    importlib.import_module('superweight.plots')\n")
    try:
        got = imports(fake)
    finally:
        fake.unlink()
    assert ("tracking", 2, True) in got and ("plots", 4, True) in got
