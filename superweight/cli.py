"""`superweight <command> [key=value | --key value ...]`

  run       the full experiment (score -> select -> perturb -> evaluate -> files + W&B)
  detect    the Super Weight detector: candidates per layer and the effect of zeroing each
  sweep     expand a W&B sweep YAML and run it locally (offline), resuming finished runs
  figures   paper figures from several runs (local out_dirs, offline runs or W&B artifacts)
  plan      peak-memory estimate of each metric / evaluation from a model config alone

Bad input prints one line `superweight: error: ...` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "run": "superweight.cli:run_main",
    "detect": "superweight.detect:main",
    "sweep": "superweight.sweep:main",
    "figures": "superweight.figures:main",
    "plan": "superweight.plan:main",
}


def run_main(argv: list[str]) -> int:
    from .config import parse_config

    cfg = parse_config(argv)  # a parse error exits before transformers is even imported
    from .experiment import Experiment, summary_table

    exp = Experiment(cfg)
    df = exp.run()
    print(summary_table(df))
    print(f"outputs: {exp.out.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"superweight: error: unknown command '{cmd}'; valid choices: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if rest and rest[0] in ("-h", "--help"):
        mod = importlib.import_module(COMMANDS[cmd].split(":")[0])
        print(mod.__doc__ or "")
        if cmd == "run":
            from .config import FIELDS, ALIASES

            print("options: " + ", ".join(sorted(FIELDS)) + "\naliases: " + ", ".join(f"{a}->{b}" for a, b in ALIASES.items()))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mod_name, fn_name = COMMANDS[cmd].split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
        return int(fn(rest) or 0)
    except ConfigError as e:
        msg = " ".join(str(e).split())
        print(f"superweight: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("superweight: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
