"""`superweight <command> [key=value | --key value ...]`

  run       the full experiment (score -> select -> perturb -> evaluate -> files + W&B)
  detect    the Super Weight detector: candidates per layer and the effect of zeroing each
  sweep     run a W&B sweep YAML locally, exactly as `wandb agent` runs it, resuming finished runs
  figures   paper figures from several runs (local out_dirs, offline runs or W&B artifacts)
  plan      peak-memory estimate of each metric / evaluation from a model config alone

`superweight <command> --help` lists every option with its meaning, type and default. Bad input prints
one line `superweight: error: ...` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import os
import sys

from ..config import ConfigError
from ..registry import Registry
from . import run, detect, sweep, figures, plan  # noqa: F401,I001 (each registers its command, in this order)
from .base import COMMANDS, help_for


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"superweight: error: unknown command '{name}'; valid choices: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    spec = COMMANDS[name]
    if any(a in ("-h", "--help") for a in rest):
        print(help_for(spec))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(spec.fn(rest) or 0)
    except ConfigError as e:
        print(f"superweight: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("superweight: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


__all__ = ["main", "COMMANDS", "Registry"]
