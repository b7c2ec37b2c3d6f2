"""Sweeps: YAML expansion against W&B's own argument builder and an independent grid, bad input, the
shipped sweep files, and a real two-run sweep on a tiny model (resume after a partial sweep, score
cache shared between runs, W&B grouping), then figures and the notebook built from its runs."""

import itertools
import json
import math
import os
import re
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from conftest import fork_sweep_runs
from superweight import commands as cli
from superweight.edge import sweep
from superweight.arguments import parse_config
from superweight.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


GRID = """
name: g
program: superweight
method: grid
command: ["${env}", "${interpreter}", -m, "${program}", run, "${args}"]
parameters:
  select.topk: {value: [1, 10, 100]}
  score.metrics: {values: [[magnitude], [grad_x_weight]]}
  perturb.names: {values: [[zero], [sign_flip], [gauss_noise]]}
  select.controls: {value: [random_k, bottom_k]}
  data.eval_windows: {value: 4}
  data.calib_windows: {int_uniform_placeholder: 0}
"""


def test_grid_order_and_agent_command_line(tmp_path):
    p = write(tmp_path, GRID.replace("data.calib_windows: {int_uniform_placeholder: 0}",
                                     "data.calib_windows: {min: 1, max: 2}"))
    s = sweep.load_sweep(p)
    runs = sweep.expand(s)
    # independent: W&B sorts parameter names and takes the Cartesian product in that order
    names = sorted(s["parameters"])
    values = {"select.controls": [["random_k", "bottom_k"]], "data.eval_windows": [4],
              "score.metrics": [["magnitude"], ["grad_x_weight"]],
              "perturb.names": [["zero"], ["sign_flip"], ["gauss_noise"]], "data.calib_windows": [1, 2],
              "select.topk": [[1, 10, 100]]}
    expect = [dict(zip(names, c)) for c in itertools.product(*[values[n] for n in names])]
    assert runs == expect and len(runs) == 12
    cmd = sweep.command_line(s, runs[0])
    assert cmd == ["/usr/bin/env", "python", "-m", "superweight", "run", "--data.calib_windows=1",
                   "--data.eval_windows=4", "--perturb.names=['zero']", "--score.metrics=['magnitude']",
                   "--select.controls=['random_k', 'bottom_k']", "--select.topk=[1, 10, 100]"]
    # the args are what wandb agent itself builds
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    ref = create_sweep_command_args({"args": {n: {"value": v} for n, v in runs[5].items()}})
    assert sweep.agent_args(runs[5]) == ref["args"]
    # and the CLI parses them into the intended config
    cfg = parse_config(cmd[5:])
    assert cfg.select.controls == ["random_k", "bottom_k"] and cfg.select.topk == [1, 10, 100]
    assert cfg.score.metrics == ["magnitude"] and cfg.perturb.names == ["zero"] and cfg.data.eval_windows == 4
    assert cfg.data.calib_windows == 1
    sweep.check_param_values(runs[0], cfg, "test")  # every swept value is what the run parses
    assert sweep.expand({**s, "run_cap": 5}) == expect[:5]
    assert sweep.expand(s, count=3) == expect[:3]


def test_random_method_is_seeded_and_capped(tmp_path):
    p = write(tmp_path, """
        method: random
        program: superweight
        run_cap: 20
        parameters:
          perturb.prob: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
          perturb.scale: {min: 0.5, max: 2.0}
          eval.batch_size: {min: 1, max: 4}
          perturb.names: {values: [[bit_flip]]}
        """)
    s = sweep.load_sweep(p)
    a, b, c = sweep.expand(s, seed=1), sweep.expand(s, seed=1), sweep.expand(s, seed=2)
    assert a == b != c and len(a) == 20 and len(sweep.expand(s, count=4)) == 4
    for r in a:
        assert 1e-4 <= r["perturb.prob"] <= 0.1 and 0.5 <= r["perturb.scale"] <= 2.0
        assert r["eval.batch_size"] in (1, 2, 3, 4) and isinstance(r["eval.batch_size"], int)
    logs = [math.log10(r["perturb.prob"]) for r in sweep.expand(s, count=20, seed=0)]
    assert min(logs) < -3 and max(logs) > -2  # spread over decades, not uniform in value
    s.pop("run_cap")
    with pytest.raises(ConfigError, match="run_cap"):
        sweep.expand(s)


@pytest.mark.parametrize("text, message", [
    ("method: grid\nparameters: [1, 2\n", "not valid YAML"),
    ("method: hyperband\nparameters:\n  score.metrics: {values: [[magnitude]]}\n", "unknown method 'hyperband'"),
    ("method: bayes\nparameters:\n  score.metrics: {values: [[magnitude]]}\n", "needs the W&B server"),
    ("method: grid\nparameters:\n  score.metrc: {values: [[magnitude]]}\n",
     "unknown option 'score.metrc' (did you mean score.metrics"),
    ("method: grid\nseed: 3\nparameters:\n  score.metrics: {values: [[magnitude]]}\n", "unknown key 'seed'"),
    ("method: grid\nparameters:\n  perturb.scale: {min: 0.5, max: 2.0}\n", "cannot be used with method grid"),
    ("method: grid\nparameters:\n  score.metrics: {values: [[magnitude], [nonsense]]}\n", "unknown metric 'nonsense'"),
    ("method: grid\nparameters:\n  score.metrics: [magnitude]\n", "must be a mapping"),
    ("method: grid\nparameters:\n  perturb.prob: {distribution: beta}\n", "unsupported distribution 'beta'"),
    # the W&B config's keys: full dotted names, never an alias or a section; list options swept as lists
    ("method: grid\nparameters:\n  metric: {values: [[magnitude]]}\n", "'metric' is an alias; name it 'score.metrics'"),
    ("method: grid\nparameters:\n  select: {values: [[1]]}\n", "'select' is a config section"),
    ("method: grid\nparameters:\n  score.metrics: {values: [magnitude]}\n", "write it as [magnitude]"),
])
def test_bad_sweep_files_fail_with_one_line(tmp_path, capsys, text, message):
    p = write(tmp_path, "program: superweight\n" + text)
    rc = cli.main(["sweep", str(p), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("superweight: error:")
    assert not (tmp_path / "outputs").exists()


def test_cli_options(tmp_path, capsys):
    assert cli.main(["sweep"]) == 2
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--count", "0"]) == 2
    assert cli.main(["sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--bogus"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name, n", [("smoke", 4), ("phase1", 54), ("bitflip", 108)])
def test_shipped_sweeps_expand_and_validate(name, n, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = sweep.plan(ROOT / "sweeps" / f"{name}.yaml")
    assert len(p["runs"]) == n
    assert len({r["out_dir"] for r in p["runs"]}) == n  # every run its own out_dir
    assert all(Path(r["out_dir"]).parent == p["dir"] for r in p["runs"])
    assert all(r["config"].wandb.group == p["group"] for r in p["runs"])
    assert p["group"].startswith(f"{name}-")
    assert all(r["command"][:5] == ["/usr/bin/env", "python", "-m", "superweight", "run"] for r in p["runs"])
    if name == "phase1":
        metrics = {r["config"].score.metrics[0] for r in p["runs"]}
        assert metrics == {"magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag", "act_mag", "act_outlier"}
        assert all(r["config"].select.controls == ["random_k", "bottom_k", "matched_k"] for r in p["runs"])
    if name == "bitflip":
        assert {(r["config"].perturb.prob, r["config"].perturb.bits, r["config"].model.dtype) for r in p["runs"]} == {
            (pr, b, d) for pr in (0.001, 0.01, 0.1, 1.0) for b in ("random", "exponent_msb", "sign")
            for d in ("float32", "bfloat16", "float16")}


def test_apply_sweep_env_under_a_wandb_agent():
    cfg = parse_config(["metric=magnitude"])
    sweep.apply_sweep_env(cfg, {"WANDB_SWEEP_ID": "abc123"})
    assert Path(cfg.out_dir).parent == Path("outputs/sweeps/abc123") and "metric=magnitude" in cfg.out_dir
    cfg2 = parse_config(["metric=magnitude", "out_dir=/x/y"])
    sweep.apply_sweep_env(cfg2, {"WANDB_SWEEP_ID": "abc123", sweep.ENV_GROUP: "g"})
    assert cfg2.out_dir == "/x/y" and cfg2.wandb.group == "g"  # an explicit out_dir wins


# ---------------------------------------------------------------------------------------------------
# a real sweep
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sweep(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    y = root / "tiny.yaml"
    y.write_text(textwrap.dedent(f"""
        name: tiny
        program: superweight
        method: grid
        command: ["${{env}}", "${{interpreter}}", -m, "${{program}}", run, "${{args}}"]
        parameters:
          model.name: {{value: {tiny_model_dir}}}
          score.metrics: {{value: [grad_x_weight]}}
          perturb.names: {{values: [[zero], [sign_flip]]}}
          select.topk: {{value: [1, 10]}}
          select.controls: {{value: [random_k, bottom_k]}}
          seeds: {{value: [0, 1]}}
          data.eval_windows: {{value: 2}}
          data.calib_windows: {{value: 2}}
          data.seq_len: {{value: 32}}
          plots: {{value: [none]}}
        """))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("SUPERWEIGHT_CACHE", str(root / "cache"))
    mp.setenv("OMP_NUM_THREADS", "1")
    fork_sweep_runs(mp)  # each run in a process forked from a warm server, not a cold interpreter
    try:
        rc1 = cli.main(["sweep", str(y), "--count", "1"])  # a sweep stopped after its first run
        p1 = sweep.plan(y)
        rc2 = cli.main(["sweep", str(y)])  # resumed: runs only the second
        p2 = sweep.plan(y)
    finally:
        mp.undo()
    return {"root": root, "yaml": y, "rc": (rc1, rc2), "after_first": p1, "after_all": p2}


def test_sweep_runs_resume_and_share_the_score_cache(tiny_sweep):
    assert tiny_sweep["rc"] == (0, 0)
    assert [r["finished"] for r in tiny_sweep["after_first"]["runs"]] == [True, False]
    runs = tiny_sweep["after_all"]["runs"]
    assert [r["finished"] for r in runs] == [True, True]
    m = [json.loads((tiny_sweep["root"] / r["out_dir"] / "manifest.json").read_text()) for r in runs]
    assert [x["config"]["perturb"]["names"] for x in m] == [["zero"], ["sign_flip"]]
    assert m[0]["score_cache"] == {"hits": 0, "misses": 2}  # grad_x_weight for seeds 0 and 1
    assert m[1]["score_cache"] == {"hits": 2, "misses": 0}  # the same score sets, from the cache
    info = json.loads((tiny_sweep["root"] / tiny_sweep["after_all"]["dir"] / "sweep.json").read_text())
    assert [r["command"] for r in info["runs"]] == [r["command"] for r in runs]


def test_sweep_runs_are_grouped_in_wandb(tiny_sweep):
    from superweight.edge.offline_runs import offline_run_dirs, read_offline_run

    p = tiny_sweep["after_all"]
    groups = []
    for r in p["runs"]:
        dirs = offline_run_dirs(tiny_sweep["root"] / r["out_dir"] / "wandb")
        assert len(dirs) == 1
        rec = read_offline_run(dirs[0])
        groups.append(rec["run"]["run_group"])
        assert rec["config"]["perturb.names"] == r["config"].perturb.names  # the flat dotted W&B config
    assert groups == [p["group"], p["group"]]


def test_rerun_of_a_finished_sweep_runs_nothing(tiny_sweep, capsys, monkeypatch):
    monkeypatch.chdir(tiny_sweep["root"])
    assert cli.main(["sweep", str(tiny_sweep["yaml"])]) == 0
    out = capsys.readouterr().out
    assert "2 runs (2 finished, 0 to run)" in out and out.count("finished, skipping") == 2
    assert cli.main(["sweep", str(tiny_sweep["yaml"]), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("done] SUPERWEIGHT_SWEEP_DIR=") == 2
    # each line is the agent's environment (run id, parameter file) and then the YAML's command line
    runs = re.findall(r"WANDB_MODE=offline WANDB_RUN_ID=(\w+) WANDB_SWEEP_PARAM_PATH=(\S+) /usr/bin/env python -m "
                      r"superweight run ", dry)
    assert [rid for rid, _ in runs] == [r["run_id"] for r in tiny_sweep["after_all"]["runs"]]
    assert all(path.endswith(f"config-{rid}.yaml") for rid, path in runs)


def test_figures_from_the_sweep_dir(tiny_sweep, capsys):
    sweep_dir = tiny_sweep["root"] / tiny_sweep["after_all"]["dir"]
    out = tiny_sweep["root"] / "figs"
    assert cli.main(["figures", str(sweep_dir), "--out", str(out), "--formats", "html,json"]) == 0
    assert "2 runs, 1 variant(s)" in capsys.readouterr().out
    names = {p.stem for p in out.glob("*.html")}
    assert {"delta_ppl_vs_k__zero__global", "delta_ppl_vs_k__sign_flip__global", "layer_sensitivity",
            "module_sensitivity", "stability_seeds"} <= names
    summary = pd.read_csv(out / "summary.csv")
    res = pd.concat([pd.read_csv(tiny_sweep["root"] / r["out_dir"] / "results.csv") for r in tiny_sweep["after_all"]["runs"]])
    for (pert, sel, k), g in res.groupby(["perturbation", "selection", "k"]):
        row = summary[(summary.value == "delta_ppl") & (summary.perturbation == pert) & (summary.selection == sel)
                      & (summary.k == k)]
        assert len(row) == 1 and row["mean"].iloc[0] == pytest.approx(g["delta_ppl"].mean())
    assert cli.main(["figures", str(tiny_sweep["root"] / "nothing-here")]) == 2


def test_notebook_executes_on_the_sweep(tiny_sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    sweep_dir = tiny_sweep["root"] / tiny_sweep["after_all"]["dir"]
    monkeypatch.setenv("SUPERWEIGHT_FIGURES_SOURCE", str(sweep_dir))
    monkeypatch.setenv("SUPERWEIGHT_FIGURES_OUT", str(tmp_path / "nbfigs"))
    monkeypatch.setenv("SUPERWEIGHT_FIGURES_FORMATS", "html")
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")
    nb = nbformat.read(ROOT / "notebooks" / "figures.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "nbfigs" / "delta_ppl_vs_k__zero__global.html").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    plotly_outputs = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    kinds = [sorted(o.get("data", {})) or o.get("output_type") for o in outputs]
    assert len(plotly_outputs) >= 4, kinds  # 2 delta figures, 2 histograms (+ stability)


def test_every_agent_macro_expands_as_the_agent_does(tmp_path, monkeypatch):
    """Expected lists written out by hand from wandb_agent.Agent._command_run's rule: a token that is exactly
    ${name} becomes the macro's list (a dict: its keys), an unknown macro nothing, an embedded one stays."""
    monkeypatch.setenv("SW_TEST_VAR", "v")
    s = {"program": "superweight", "command": [
        "${env}", "${interpreter}", "-m", "${program}", "run", "${args_no_equals}", "${args_json_file}",
        "${args_dict}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}", "${args_append_hydra}",
        "${args_override_hydra}", "${no_such_macro}", "--x=${args}", "${envvar:SW_TEST_VAR}", "${args}"]}
    params = {"seeds": [0], "wandb.requeue_on_sigterm": True, "perturb.prob": 0.5, "flag": False}
    got = sweep.command_line(s, params, tmp_path / "c.json")
    assert got == [
        "/usr/bin/env", "python", "-m", "superweight", "run",
        "--seeds", "[0]", "--wandb.requeue_on_sigterm", "True", "--perturb.prob", "0.5", "--flag", "False",
        str(tmp_path / "c.json"),
        "seeds", "wandb.requeue_on_sigterm", "perturb.prob", "flag",
        "seeds=[0]", "wandb.requeue_on_sigterm=True", "perturb.prob=0.5", "flag=False",
        "--seeds=[0]", "--wandb.requeue_on_sigterm", "--perturb.prob=0.5",
        '{"seeds": [0], "wandb.requeue_on_sigterm": true, "perturb.prob": 0.5, "flag": false}',
        "+seeds=[0]", "+wandb.requeue_on_sigterm=True", "+perturb.prob=0.5", "+flag=False",
        "++seeds=[0]", "++wandb.requeue_on_sigterm=True", "++perturb.prob=0.5", "++flag=False",
        "--x=${args}", "v",
        "--seeds=[0]", "--wandb.requeue_on_sigterm=True", "--perturb.prob=0.5", "--flag=False"]
    # the CLI reads the no-equals form the same as the default one
    assert parse_config(["--seeds", "[0]", "--perturb.prob", "0.5"]) == parse_config(["--seeds=[0]", "--perturb.prob=0.5"])
