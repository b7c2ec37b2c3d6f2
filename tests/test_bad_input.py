"""Bad input never costs a result and never crashes: every case below, given on the command line or in a
YAML file, gives exactly one stderr line `superweight: error: ...` that names the bad value and the valid
choices, exit code 2, no traceback, and writes nothing (no out_dir, nothing in the working directory,
nothing but caches in the cache dir). A property test feeds random argument lists to the parser.

The table runs through `superweight.commands.main` in-process (the same function the console script calls;
stdout/stderr captured by pytest); a few cases also go through the real `python -m superweight`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superweight.arguments import ALIASES, FIELDS, parse_config
from superweight.commands import main
from superweight.config import ConfigError
from superweight.run.validation import validate

CACHE_SUBDIRS = {"models", "tokens", "scores"}  # what a cache dir may hold (caches, never outputs)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def world(tmp_path, tiny_model_dir, monkeypatch):
    """Input files of every kind, an isolated cache dir and an empty working directory."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("   \n\n  \n")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    (d / "short.txt").write_text("hello world\n")
    (d / "afile").write_text("I am a file, not a directory\n")
    (d / "bad.yaml").write_text("score:\n  metrics: [magnitude, grad_x_weight\n")
    (d / "list.yaml").write_text("- magnitude\n- grad_x_weight\n")
    (d / "unknown_key.yaml").write_text("score:\n  metricz: [magnitude]\n")
    (d / "bad_value.yaml").write_text("metric: bogus_metric\ntopk: [1, 10]\n")
    (d / "bad_k.yaml").write_text("select:\n  topk: [10, -3]\n")
    (d / "badmodel").mkdir()
    (d / "badmodel" / "config.json").write_text("{not json")
    (d / "sweep_bad.yaml").write_text("method: grid\nparameters:\n  metric: {values: [magnitude\n")
    (d / "sweep_method.yaml").write_text("method: hyperband\nparameters:\n  score.metrics: {values: [[magnitude]]}\n")
    (d / "sweep_param.yaml").write_text("method: grid\nparameters:\n  score.metricz: {values: [[magnitude]]}\n")
    (d / "sweep_alias.yaml").write_text("method: grid\nparameters:\n  metric: {values: [[magnitude]]}\n")
    (d / "sweep_value.yaml").write_text(yaml.safe_dump({
        "method": "grid", "command": ["${env}", "${interpreter}", "-m", "superweight", "run", "${args}"],
        "parameters": {"model.name": {"value": str(tiny_model_dir)},
                       "score.metrics": {"values": [["magnitude"], ["bogus_metric"]]}},
    }))
    (d / "sweep_list.yaml").write_text("- method\n- grid\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return {"inputs": d, "cache": tmp_path / "cache", "out": tmp_path / "out", "cwd": cwd, "tmp": tmp_path,
            "model": str(tiny_model_dir)}


def _tasks_hint() -> str:
    from superweight.core.evaluation import TASKS

    return next(iter(TASKS), "valid choices")


# (id, argv after `run` with {model} {in} {tmp} placeholders, substrings the message must contain:
#  the bad value and (a part of) the valid choices). Each case gets model=, out_dir= and cache_dir= unless
#  it sets them itself, and small data settings so that a case that wrongly passed would finish quickly.
RUN_CASES = [
    ("metric", ["metric=bogus_metric"], ["'bogus_metric'", "magnitude", "grad_x_weight"]),
    ("perturbation", ["perturb=melt"], ["'melt'", "zero", "bit_flip"]),
    ("control", ["controls=random_k,top_half"], ["'top_half'", "random_k", "bottom_k"]),
    ("mode", ["mode=per_column"], ["'per_column'", "global", "per_layer"]),
    ("corpus", ["corpus=wikitext9"], ["'wikitext9'", "boolq"]),
    ("dtype", ["dtype=float8"], ["'float8'", "float32", "bfloat16"]),
    ("task", ["tasks=mmlu"], ["'mmlu'", "TASKS"]),
    ("device", ["device=tpu"], ["'tpu'", "cpu"]),
    ("wandb_mode", ["wandb.mode=sometimes"], ["'sometimes'", "offline"]),
    ("plot_format", ["plots=gif"], ["'gif'", "html"]),
    ("text_format", ["data.text_format=xml"], ["'xml'", "lines"]),
    ("saliency", ["score.saliency=big"], ["'big'", "obd"]),
    ("k_zero", ["topk=0"], ["got 0", "> 0"]),
    ("k_negative", ["topk=1,-5"], ["got -5", "> 0"]),
    ("k_empty", ["topk="], ["topk is empty", "K > 0"]),
    ("k_not_int", ["topk=ten"], ["'ten'", "integer"]),
    ("k_above_eligible", ["topk=1,1000000000"], ["1000000000", "valid: 1..18432"]),
    ("k_per_layer", ["mode=per_layer", "topk=5000"], ["5000", "per_layer", "valid: 1..512"]),
    ("k_per_row", ["mode=global,per_row", "topk=33"], ["33", "per_row", "valid: 1..32"]),
    ("prob_above", ["perturb=bit_flip", "perturb.prob=1.5"], ["1.5", "[0, 1]"]),
    ("prob_below", ["perturb=bit_flip", "perturb.prob=-0.1"], ["-0.1", "[0, 1]"]),
    ("prob_nan", ["perturb.prob=nan"], ["nan", "[0, 1]"]),
    ("scale_negative", ["perturb=sign_flip", "perturb.scale=-1"], ["-1.0", ">= 0"]),
    ("scale_nan", ["perturb=gauss_noise", "perturb.scale=nan"], ["nan", ">= 0"]),
    ("scale_inf", ["perturb=sign_flip", "perturb.scale=inf"], ["inf", ">= 0"]),
    ("scale_not_number", ["perturb.scale=big"], ["'big'", "number"]),
    ("bit_fp32", ["perturb=bit_flip", "perturb.bits=40"], ["40", "float32", "0..31"]),
    ("bit_fp16", ["perturb=bit_flip", "perturb.bits=16", "dtype=float16"], ["16", "float16", "0..15"]),
    ("bit_negative", ["perturb=bit_flip", "perturb.bits=-1"], ["-1", "0.."]),
    ("bit_name", ["perturb=bit_flip", "perturb.bits=mantissa"], ["'mantissa'", "exponent_msb"]),
    ("seq_len_context", ["seq_len=100000"], ["100000", "context", "2..256"]),
    ("seq_len_one", ["seq_len=1"], ["got 1", ">= 2"]),
    ("stride", ["data.stride=0"], ["got 0", "seq_len"]),
    ("eval_windows", ["data.eval_windows=-1"], ["got -1", "> 0"]),
    ("eval_windows_all", ["data.eval_windows=0"], ["eval_windows=all", "wikitext2", "give a number"]),
    ("seed_negative", ["seeds=0,-1"], ["got -1", ">= 0"]),
    ("seed_not_int", ["seed=first"], ["'first'", "integer"]),
    ("bool", ["score.cache=maybe"], ["'maybe'", "true"]),
    ("data_empty", ["corpus={in}/empty.txt"], ["empty.txt", "empty", "boolq"]),
    ("data_blank", ["corpus={in}/blank.txt"], ["blank.txt", "empty", "boolq"]),
    ("data_binary", ["corpus={in}/binary.bin"], ["binary.bin", "binary", "text file"]),
    ("data_not_utf8", ["corpus={in}/latin1.txt"], ["latin1.txt", "UTF-8", "boolq"]),
    ("data_missing", ["corpus={in}/missing.txt"], ["missing.txt", "does not exist", "boolq"]),
    ("data_dir", ["corpus={in}"], ["not a regular file", "text file"]),
    ("data_too_short", ["corpus={in}/short.txt"], ["short.txt", "windows", "data.seq_len"]),
    ("model_offline", ["model=no-such-org/no-such-model-xyz"], ["no-such-org/no-such-model-xyz", "smollm2-135m"]),
    ("model_missing_dir", ["model={tmp}/no_model_here"], ["no_model_here", "does not exist", "local model dir"]),
    ("model_bad_config", ["model={in}/badmodel"], ["badmodel", "local model dir"]),
    ("model_gguf_missing", ["model={in}/missing.gguf"], ["missing.gguf", "does not exist", "local model dir"]),
    ("quantize_cpu", ["quantize=4bit", "device=cpu"], ["4-bit", "quantize=8bit or none"]),  # 8bit runs on the CPU
    ("quantize_name", ["quantize=3bit"], ["'3bit'", "8bit"]),
    ("include_regex", ["score.include=[unclosed"], ["'[unclosed'", "regex"]),
    ("include_nothing", ["score.include=^nothing_matches$"], ["nothing_matches", "model.layers.0"]),
    ("out_dir_file", ["out_dir={in}/afile"], ["afile", "not a directory"]),
    ("out_dir_under_file", ["out_dir={in}/afile/run"], ["afile/run", "is a file"]),
    ("cache_dir_file", ["cache_dir={in}/afile"], ["afile", "not a directory"]),
    ("unknown_option", ["metrik=magnitude"], ["'metrik'", "metric"]),
    ("positional", ["magnitude"], ["'magnitude'", "key=value"]),
    ("no_value", ["--model"], ["'model'", "needs a value"]),
    ("two_values", ["seq_len=16", "32"], ["'seq_len'", "one value"]),
    ("yaml_malformed", ["config={in}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
    ("yaml_list", ["config={in}/list.yaml"], ["list.yaml", "mapping"]),
    ("yaml_unknown_key", ["config={in}/unknown_key.yaml"], ["'score.metricz'", "score.metrics"]),
    ("yaml_bad_value", ["config={in}/bad_value.yaml"], ["'bogus_metric'", "magnitude"]),
    ("yaml_bad_k", ["config={in}/bad_k.yaml"], ["got -3", "> 0"]),
    ("yaml_missing", ["config={in}/nope.yaml"], ["nope.yaml", "does not exist"]),
    # argparse dropped a lone `--` value: these ended in a TypeError traceback and exit 1 (hypothesis found them)
    ("corpus_dashes", ["corpus=--"], ["'--'", "boolq"]),
    ("device_dashes", ["device=--"], ["'--'", "cpu"]),
    ("model_dashes", ["model=--"], ["'--'", "smollm2-135m"]),
    ("metric_dashes", ["metric=--"], ["'--'", "magnitude"]),
    ("metric_dash_value", ["metric=magnitude,-x"], ["'-x'", "magnitude"]),
    ("seq_len_dashes", ["seq_len=--"], ["'--'", "integer"]),
    ("seeds_dashes", ["seeds=--"], ["'--'", "integer"]),
    ("wandb_mode_dashes", ["wandb.mode=--"], ["'--'", "offline"]),
]

SWEEP_CASES = [
    ("sweep_malformed", ["{in}/sweep_bad.yaml"], ["sweep_bad.yaml", "not valid YAML"]),
    ("sweep_not_mapping", ["{in}/sweep_list.yaml"], ["sweep_list.yaml", "mapping"]),
    ("sweep_method", ["{in}/sweep_method.yaml"], ["'hyperband'", "grid, random"]),
    ("sweep_unknown_param", ["{in}/sweep_param.yaml"], ["'score.metricz'", "score.metrics"]),
    ("sweep_alias_param", ["{in}/sweep_alias.yaml"], ["'metric'", "alias", "score.metrics"]),
    ("sweep_bad_value", ["{in}/sweep_value.yaml"], ["'bogus_metric'", "magnitude"]),
    ("sweep_missing", ["{in}/nope.yaml"], ["nope.yaml", "does not exist"]),
    ("sweep_bad_count", ["{in}/sweep_value.yaml", "--count", "0"], ["--count", "> 0"]),
]
N_BAD_INPUTS = len(RUN_CASES) + len(SWEEP_CASES)


def _fill(tokens: list[str], world) -> list[str]:
    return [t.format(model=world["model"], tmp=world["tmp"], **{"in": world["inputs"]}) for t in tokens]


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _assert_one_line_error(rc, out: str, err: str, expect: list[str]) -> str:
    assert rc == 2, f"exit code {rc}; stderr: {err[-1500:]}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {lines}"
    line = lines[0]
    assert line.startswith("superweight: error: "), line
    for s in expect:
        assert s in line, f"{s!r} not in {line!r}"
    return line


def _check_nothing_written(world, before_inputs: dict[str, bytes]) -> None:
    assert not world["out"].exists(), "out_dir was created"
    assert list(world["cwd"].iterdir()) == [], "files appeared in the working directory"
    assert _tree(world["inputs"]) == before_inputs, "an input file or directory changed"
    for p in _cache_files(world["cache"]):
        rel = p.relative_to(world["cache"])
        assert rel.parts[0] in CACHE_SUBDIRS and not p.name.endswith(".tmp") and "tmp" not in p.suffix, rel
    leftovers = {p.name for p in world["tmp"].iterdir()} - {"inputs", "cache", "cwd"}
    assert not leftovers, f"unexpected files next to the run: {leftovers}"


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_run_input(case, world, capsys):
    name, tokens, expect = case
    argv = _fill(tokens, world)
    keys = {t.split("=", 1)[0].lstrip("-") for t in argv}
    keys |= {ALIASES[k] for k in keys if k in ALIASES}
    defaults = {"model.name": world["model"], "out_dir": world["out"], "cache_dir": world["cache"],
                "data.eval_windows": 2, "data.calib_windows": 1, "data.seq_len": 16, "wandb.mode": "disabled",
                "plots": "none"}
    argv += [f"{k}={v}" for k, v in defaults.items() if k not in keys]  # only what the case leaves unset
    if name == "task":
        expect = ["'mmlu'", _tasks_hint()]
    if name == "quantize_cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("quantize=4bit is valid with a GPU")
    before = _tree(world["inputs"])
    rc = main(["run", *argv])
    cap = capsys.readouterr()
    _assert_one_line_error(rc, cap.out, cap.err, expect)
    assert cap.out == "", cap.out
    _check_nothing_written(world, before)


@pytest.mark.parametrize("case", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_bad_sweep_input(case, world, capsys):
    name, tokens, expect = case
    argv = _fill(tokens, world) + ["--sweep-dir", str(world["out"])]
    before = _tree(world["inputs"])
    rc = main(["sweep", *argv])
    cap = capsys.readouterr()
    _assert_one_line_error(rc, cap.out, cap.err, expect)
    _check_nothing_written(world, before)


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_a_value_starting_with_dashes_reaches_every_option_as_typed(key):
    """`key=--`, `key=-x`, `key=-`: the option gets exactly that value (a string option) or a ConfigError that
    quotes it (a number, a flag); argparse never drops or reinterprets it."""
    for value in ("--", "-x", "-"):
        try:
            cfg = parse_config([f"{key}={value}"])
        except ConfigError as e:
            assert f"'{value}'" in str(e), (key, value, str(e))
            continue
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got in (value, [value]), (key, value, got)


def test_unknown_command(capsys):
    rc = main(["runn", "metric=magnitude"])
    cap = capsys.readouterr()
    _assert_one_line_error(rc, cap.out, cap.err, ["'runn'", "run", "sweep"])


def _cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "superweight", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.slow  # three cold interpreters; the same cases run in-process above (yaml_malformed, sweep_bad_value,
# k_above_eligible), and tests/test_e2e.py keeps one real `python -m superweight` in the default run
def test_real_cli_bad_inputs(world):
    """The real console entry point: a malformed YAML, a bad name in a sweep file, K above the eligible
    weights (found after loading the model): one line, exit 2, nothing written."""
    inp, out = world["inputs"], world["out"]
    cases = [
        (["run", f"config={inp}/bad.yaml", f"out_dir={out}"], ["bad.yaml", "not valid YAML"]),
        (["sweep", f"{inp}/sweep_value.yaml", "--sweep-dir", str(out)], ["'bogus_metric'", "magnitude"]),
        (["run", f"model={world['model']}", "topk=1,1000000000", f"cache_dir={world['cache']}", f"out_dir={out}",
          "data.seq_len=16", "data.eval_windows=2", "data.calib_windows=1"], ["1000000000", "valid: 1..18432"]),
    ]
    before = _tree(inp)
    for args, expect in cases:
        p = _cli(args, world["cwd"])
        _assert_one_line_error(p.returncode, p.stdout, p.stderr, expect)
        _check_nothing_written(world, before)


# ---- property: no argument list produces a traceback -------------------------------------------------

KEYS = sorted(set(FIELDS) | set(ALIASES)) + ["config"]
JUNK = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
VALUES = st.one_of(
    JUNK,
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["magnitude", "grad_x_weight", "zero", "bit_flip", "random_k", "global", "per_row", "boolq",
                     "float16", "exponent_msb", "sign", "true", "false", "none", "null", "[]", "[1, 10]",
                     "['random_k', 'bottom_k']", "1,10,100", "-1", "0", "1e309", "0x10", "[", "]", "''", "=",
                     "--", "-", "/", ".", "/dev/null", "~", "$HOME"]),
)


@st.composite
def argv_lists(draw):
    out = []
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.one_of(st.sampled_from(KEYS), JUNK))
        form = draw(st.sampled_from(["kv", "dashdash_eq", "dashdash_sep", "bare", "flag"]))
        val = draw(VALUES)
        if form == "kv":
            out.append(f"{key}={val}")
        elif form == "dashdash_eq":
            out.append(f"--{key}={val}")
        elif form == "dashdash_sep":
            out += [f"--{key}", val]
        elif form == "bare":
            out.append(val)
        else:
            out.append(f"--{key}")
    return out


def _parse_and_validate(argv: list[str], out_dir: Path) -> None:
    try:
        cfg = parse_config(argv)
        cfg.out_dir = str(out_dir)  # never let a random out_dir / cache_dir point at the real filesystem
        cfg.cache_dir = None
        validate(cfg)
    except ConfigError as e:
        msg = str(e)
        assert msg.strip(), "empty error message"
        assert len(" ".join(msg.split())) < 4000


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(argv=argv_lists())
def test_property_no_traceback_from_any_arguments(argv, tmp_path):
    """Any argument list parses into a valid config or raises ConfigError: nothing else escapes."""
    _parse_and_validate(argv, tmp_path / "never_created")
    assert not (tmp_path / "never_created").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), mapping=st.dictionaries(st.sampled_from(KEYS[:-1]) | JUNK, VALUES | st.lists(VALUES, max_size=3), max_size=4))
def test_property_no_traceback_from_any_yaml(text, mapping, tmp_path):
    """Any YAML file (random text, or a random mapping of real and junk keys) parses or raises ConfigError."""
    for i, body in enumerate([text, yaml.safe_dump(mapping)]):
        p = tmp_path / f"c{i}.yaml"
        p.write_text(body)
        _parse_and_validate([f"config={p}"], tmp_path / "never_created")


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in_process", "real_cli"])
def test_junk_argument_lists_exit_2_with_one_line(tmp_path, capsys, real):
    """A handful of junk argument lists: exit 2 with one line, nothing written (none of these is a valid run).
    In-process through `main`; the slow set repeats them through the real `python -m superweight` (three cold
    interpreters), where stray warnings of a real process would show on stderr."""
    import random

    rng = random.Random(6)
    junk = ["=", "--", "--=", "-x", "metric", "topk=[1,", "--select.topk", "ü=ü", "seeds=0x", "--perturb.prob=.5.5"]
    for _ in range(3):
        argv = rng.sample(junk, 3) + [f"out_dir={tmp_path / 'out'}"]
        if real:
            p = _cli(["run", *argv], tmp_path)
            rc, err = p.returncode, p.stderr
        else:
            rc, err = main(["run", *argv]), capsys.readouterr().err
        assert rc == 2, (argv, err[-1000:])
        assert "Traceback" not in err
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, (argv, err)
        assert not (tmp_path / "out").exists()
