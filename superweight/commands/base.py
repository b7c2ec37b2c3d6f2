"""The command registry: each command is one function `fn(argv) -> exit code`, registered with its usage
line and its options dataclass (None: it takes only run options). `--help` is generated from them."""

from __future__ import annotations

from ..arguments import help_text
from ..registry import Registry

# usage: the first lines of --help; options: the command's own dataclass; run_config: takes RunConfig options
COMMANDS = Registry("command", usage="", options=None, run_config=True)
register = COMMANDS.register


def help_for(spec) -> str:
    doc = spec.fn.__doc__.strip() if spec.fn.__doc__ else ""
    return help_text(spec.usage + ("\n\n" + doc if doc else ""), spec.options, spec.run_config)
