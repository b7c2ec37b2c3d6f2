"""Command lines and YAML files -> a typed `RunConfig` (plus a command's own options), and `--help` text.

Every form a researcher or `wandb agent` uses gives the same config:

    superweight run model=X metric=grad_x_weight topk=100 controls=random_k,bottom_k seeds=0,1,2
    superweight run --model X --metric grad_x_weight --topk 100 --controls random_k bottom_k --seeds 0 1 2
    superweight run --model=X --score.metrics=grad_x_weight --select.controls="['random_k', 'bottom_k']"
    superweight run config=exp.yaml topk=10,100          # YAML file, then CLI overrides

`parse_pairs` turns argv into canonical (dotted key, values) pairs, resolving short aliases such as
`metric` -> `score.metrics`; simple-parsing then builds the typed dataclass. A command's own options
(detect's `candidates`, plan's `gpu_mem`, ...) are a dataclass too, parsed by the same code (`parse_command`),
and `help_text` prints every option's meaning, type and default from the dataclass field docs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import io
import re
import typing
from pathlib import Path
from typing import Any, get_origin

import simple_parsing
import yaml

from .config import ConfigError, RunConfig, choices

# Short names a researcher types; the seed's canonical command uses them. Accepted on the command line and
# in YAML configs; sweep YAMLs must use the full dotted names (the W&B config's keys).
ALIASES = {
    "model": "model.name",
    "gguf_file": "model.gguf_file",
    "dtype": "model.dtype",
    "device": "model.device",
    "quantize": "model.quantize",
    "metric": "score.metrics",
    "metrics": "score.metrics",
    "topk": "select.topk",
    "k": "select.topk",
    "mode": "select.modes",
    "modes": "select.modes",
    "controls": "select.controls",
    "perturb": "perturb.names",
    "perturbation": "perturb.names",
    "perturbations": "perturb.names",
    "corpus": "data.corpus",
    "seq_len": "data.seq_len",
    "tasks": "eval.tasks",
    "seed": "seeds",
}


def field_types(cls=RunConfig, prefix: str = "") -> dict[str, Any]:
    """Flatten a dataclass tree into {dotted.key: type}."""
    out = {}
    resolved = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = resolved[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(field_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


FIELDS = field_types()


def _is_list(tp) -> bool:
    return get_origin(tp) is list


def split_value(raw: str) -> list[str]:
    """`a,b`, `['a', 'b']` and `[1, 10]` (what wandb agent passes) -> ['a', 'b']."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = [v.strip().strip("'\"") for v in raw[1:-1].split(",") if v.strip()]
        return [str(v) for v in (val if isinstance(val, (list, tuple)) else [val])]
    return [v.strip() for v in raw.split(",") if v.strip() != ""]


def canonical_key(key: str, extra: dict[str, Any] | None = None) -> str:
    """The dotted config key (or a command option name in `extra`) for what a user typed."""
    key = key.strip().lstrip("-").replace("-", "_")
    if extra and key in extra:
        return key
    key = ALIASES.get(key, key)
    if key not in FIELDS:
        valid = sorted(set(FIELDS) | set(ALIASES) | set(extra or {}))
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown option '{key}'{hint}; valid options: {', '.join(valid)}")
    return key


def _looks_like_key(tok: str) -> bool:
    return tok.startswith("--") or bool(re.match(r"^([A-Za-z_][\w.\-]*)=", tok))


def parse_pairs(argv: list[str], extra: dict[str, Any] | None = None, positional: bool = False
                ) -> tuple[list[tuple[str, list[str]]], str | None, list[str]]:
    """Group argv into (canonical key, values) pairs in order. Returns (pairs, `config=` YAML path,
    positional arguments). `extra` = a command's own options {name: type}; `positional` allows bare
    arguments (sweep files, figure sources) before or between options."""
    pairs: list[tuple[str, list[str]]] = []
    config_path, bare = None, []
    types = {**FIELDS, **(extra or {})}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not _looks_like_key(tok):
            if positional:
                bare.append(tok)
                i += 1
                continue
            raise ConfigError(f"unexpected argument '{tok}': use key=value or --key value")
        body = tok[2:] if tok.startswith("--") else tok
        key, eq, raw = body.partition("=")
        values_raw = [raw] if eq else []
        i += 1
        if key == "_wandb":  # W&B's own key in a sweep controller's resume command (wandb/wandb#4237): no option
            while not eq and i < len(argv) and not _looks_like_key(argv[i]):
                i += 1
            continue
        ckey = None if key in ("config", "config_path") else canonical_key(key, extra)
        tp = types.get(ckey)
        if not eq or not positional:
            # `--seeds 0 1 2` and `seeds=0 1 2`: values follow until the next key; a bool flag may stand
            # alone; a scalar option takes one value (so positionals may follow it)
            while i < len(argv) and not _looks_like_key(argv[i]):
                if tp is bool and argv[i].lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    break
                values_raw.append(argv[i])
                i += 1
                if positional and not _is_list(tp):
                    break
        if ckey is None:
            if len(values_raw) != 1:
                raise ConfigError("option 'config' takes one YAML file path")
            config_path = values_raw[0]
            continue
        values: list[str] = []
        for raw_v in values_raw:
            values.extend(split_value(raw_v) if _is_list(tp) else [raw_v])
        if ckey == "data.eval_windows":  # `all` = every window of the split (the papers' protocol)
            values = ["0" if v.strip().lower() == "all" else v for v in values]
        if not values:
            if tp is bool:
                values = ["true"]
            elif not _is_list(tp):
                raise ConfigError(f"option '{key}' needs a value")
        if not _is_list(tp) and len(values) != 1:
            raise ConfigError(f"option '{key}' takes one value, got {values}")
        pairs.append((ckey, values))
    return pairs, config_path, bare


def _flatten_yaml(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # a section (perturb: {names: ..., scale: ...}); aliases apply to leaves only
            out.extend(_flatten_yaml(v, f"{key}."))
        else:
            out.append((key, v))
    return out


def load_yaml_pairs(path: str) -> list[tuple[str, list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of options, got {type(data).__name__}")
    pairs = []
    for key, v in _flatten_yaml(data):
        ckey = canonical_key(key)
        tp = FIELDS[ckey]
        if isinstance(v, list):
            vals = [str(x) for x in v]
        elif v is None:
            vals = []
        else:
            vals = split_value(str(v)) if _is_list(tp) else [str(v)]
        if ckey == "data.eval_windows":
            vals = ["0" if str(x).strip().lower() == "all" else x for x in vals]
        if not _is_list(tp) and len(vals) != 1:
            if v is None:  # explicit null for an optional field: keep the default
                continue
            raise ConfigError(f"config file '{path}': option '{key}' takes one value, got {v!r}")
        pairs.append((ckey, vals))
    return pairs


class _Parser(simple_parsing.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line, code 2
        message = message.replace(repr(_SHIELD)[1:-1], "").replace(_SHIELD, "")  # argparse quotes repr()
        m = re.search(r"argument --([\w.]+): invalid (?:choice|Literal value): '([^']*)'", message)
        if m and choices(FIELDS.get(m.group(1))):  # a Literal's choices (config.py), in the one-line format
            raise ConfigError(f"unknown {m.group(1)} '{m.group(2)}'; valid choices: "
                              f"{', '.join(choices(FIELDS[m.group(1)]))}")
        for bad, valid in (("invalid int value", "an integer"), ("invalid float value", "a number"),
                           ("Boolean value expected", "true, false, yes, no, 1, 0")):
            if bad in message:
                message += f"; valid: {valid}"
                break
        raise ConfigError(message)


def _parser(cls, dest: str, add_help: bool = False) -> _Parser:
    parser = _Parser(add_help=add_help, argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
                     nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
                     formatter_class=simple_parsing.SimpleHelpFormatter)
    parser.add_arguments(cls, dest=dest)
    return parser


# argparse drops a lone `--` from an option's values (`corpus=--` became an empty list that crashed later) and
# reads a list value such as `-x` as an option. Such values cross argparse behind this marker, which `_unshield`
# removes from the parsed config (and `_Parser.error` from a message), so every option sees the value typed.
_SHIELD = "\x00"
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # what argparse itself takes for a value, not an option


def _shield(v: str, in_list: bool) -> str:
    if v == "--" or (in_list and v.startswith("-") and not _NEGATIVE_NUMBER.fullmatch(v)):
        return _SHIELD + v
    return v


def _unshield(obj):
    """The parsed dataclass tree with every shielded string value restored (in place)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _unshield(v)
        elif isinstance(v, str) and v.startswith(_SHIELD):
            setattr(obj, f.name, v[len(_SHIELD):])
        elif isinstance(v, list):
            setattr(obj, f.name, [x[len(_SHIELD):] if isinstance(x, str) and x.startswith(_SHIELD) else x for x in v])
    return obj


def _tokens(merged: dict[str, list[str]], types: dict[str, Any]) -> list[str]:
    tokens: list[str] = []
    for k, vals in merged.items():
        tp = types[k]
        if _is_list(tp):
            tokens.append(f"--{k}")
            tokens.extend(_shield(v, True) for v in vals)
        elif type(None) in typing.get_args(tp) and vals[0].lower() in ("none", "null", ""):
            continue  # keep the default None
        else:
            tokens.append(f"--{k}={_shield(vals[0], False)}")
    return tokens


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse any of the supported argument forms (plus an optional YAML file) into a RunConfig."""
    return parse_command(list(argv or []))[1]


def parse_command(argv: list[str], options=None, positional: str | None = None):
    """(command options, RunConfig) from one argv. `options`: the command's own dataclass (or None);
    `positional`: the name of its list field that takes bare arguments (or None)."""
    extra = field_types(options) if options is not None else {}
    pairs, config_path, bare = parse_pairs(argv, extra, positional is not None)
    if config_path is not None:
        pairs = load_yaml_pairs(config_path) + pairs
    merged: dict[str, list[str]] = {}
    own: dict[str, list[str]] = {}
    for k, v in pairs:  # later wins: YAML < CLI, and the last CLI occurrence wins
        (own if k in extra else merged)[k] = v
    if positional is not None and bare:
        own[positional] = own.get(positional, []) + bare
    ns = _parser(RunConfig, "config").parse_args(_tokens(merged, FIELDS))
    opts = None
    if options is not None:
        opts = _unshield(_parser(options, "opts").parse_args(_tokens(own, extra)).opts)
    return opts, _unshield(ns.config)


def help_text(usage: str, options=None, run_config: bool = True) -> str:
    """`--help`: the command's usage, its own options and (if it takes one) every RunConfig option, each with
    its meaning, type and default from the dataclass field docs; then the short aliases."""
    parts = [usage.strip(), ""]
    for cls, title in ((options, "command options"), (RunConfig if run_config else None, "run options")):
        if cls is None:
            continue
        p = _parser(cls, "x")
        buf = io.StringIO()
        p.print_help(file=buf)
        text = buf.getvalue()
        text = text[text.find("\n\n") + 2:] if text.startswith("usage:") else text
        parts += [f"{title}:", _strip_argparse_noise(text)]
    if run_config:
        parts.append("aliases: " + ", ".join(f"{a}={b}" for a, b in ALIASES.items()))
        parts.append("forms: key=value, --key value, --key=value; lists as a,b or a b or ['a', 'b']; "
                     "config=FILE.yaml for a YAML file (CLI options override it)")
    return "\n".join(parts).rstrip() + "\n"


def _strip_argparse_noise(text: str) -> str:
    out = []
    for ln in text.splitlines():
        if ln.strip().startswith(("options:", "optional arguments:")):
            continue
        m = re.match(r"^\w+ \['x\.?([\w.]*)'\]:$", ln)
        out.append(f"[{m.group(1) or 'general'}]" if m else ln)
    return "\n".join(out)


__all__ = ["ALIASES", "FIELDS", "field_types", "split_value", "canonical_key", "parse_pairs", "load_yaml_pairs",
           "parse_config", "parse_command", "help_text", "argparse"]
