"""W&B as its users live in it, on a tiny model, read back from the offline records:

* one config shape: a run started exactly as `wandb agent` starts one (WANDB_SWEEP_ID, WANDB_RUN_ID,
  WANDB_SWEEP_PARAM_PATH -> the agent's config-<id>.yaml written by wandb's own writer, then the YAML's
  command line built by wandb's own argument builder, in a new process group) records the same config keys
  and values as the same parameter set run by `superweight sweep`; alias/section/scalar-for-list sweep
  parameters are refused with one line, by --dry-run and under the agent, before anything is written;
* live: one history step per finished row, the final plots in the last row's step, stage timings and
  headline summary;
* stops: a real SIGTERM mid-run with wandb.requeue_on_sigterm marks the record preempting (exit 143) and a
  rerun finishes the same W&B run from .progress.jsonl; SIGTERM without it, Ctrl-C (130, one line), a crash
  (failed record with the error), a W&B failure (non-zero exit unless wandb.mode=disabled);
* lineage: a two-run sweep sharing one score set logs one scores artifact digest in both records;
* figures from W&B: finished runs only, the latest version of each artifact.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import fork_sweep_runs, start_forked

from superweight import commands
from superweight.edge import signals, sweep
from superweight.arguments import parse_config
from superweight.config import ConfigError
from superweight.edge.outputs import RunOutputs
from superweight.edge.offline_runs import offline_run_dirs, read_offline_run
from superweight.edge.tracking import WandbTracker, run_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["score.metrics=magnitude", "select.topk=1", "select.controls=random_k", "select.control_draws=1",
        "data.eval_windows=2", "data.calib_windows=1", "data.seq_len=32", "seeds=0", "perturb.names=zero",
        "plots=none"]  # 2 rows: top_k and one random_k draw


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def records(out, timeout: float = 60) -> list[dict]:
    """The offline records of out_dir, oldest first. wandb-core may append a finished run's last records to
    its .wandb file just after run.finish() returns (in-process runs): wait for each record's exit."""
    t0 = time.time()
    while True:
        recs = [read_offline_run(d) for d in offline_run_dirs(Path(out) / "wandb")]
        if all(r["exit_code"] is not None for r in recs) or time.time() - t0 > timeout:
            return recs
        time.sleep(0.2)


def run(model_dir, out, *extra) -> int:
    return commands.main(["run", f"model.name={model_dir}", *TINY, f"out_dir={out}", *extra])


def agent_env(**extra) -> dict:
    """The environment wandb agent gives its runs: its own (minus WANDB_SERVICE), the venv's python first."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "WANDB_SWEEP_ID", "WANDB_RUN_ID",
                                                             "WANDB_SWEEP_PARAM_PATH")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", **extra)
    return env


def agent_command(sweep_cfg: dict, params: dict) -> list[str]:
    """The command line exactly as wandb_agent.Agent._command_run builds it."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep_cfg["program"]], env=["/usr/bin/env"])
    out = []
    for c in sweep_utils.create_sweep_command(sweep_cfg["command"]):
        c = str(c)
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


# ---------------------------------------------------------------------------------------------------
# one config shape
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smoke", "phase1", "bitflip"])
def test_shipped_sweeps_name_full_keys_and_a_project(name):
    s = sweep.load_sweep(ROOT / "sweeps" / f"{name}.yaml")
    assert s["project"] == "superweight"
    assert all("." in p or p == "seeds" for p in s["parameters"])
    for params in sweep.expand(s)[:3]:
        sweep.check_param_values(params, parse_config(sweep.agent_args(params)), name)


@pytest.mark.parametrize("old, new, message", [
    ("  score.metrics:", "  metric:", "sweep parameter 'metric' is an alias; name it 'score.metrics'"),
    ("  perturb.names:", "  perturb:", "sweep parameter 'perturb' is an alias; name it 'perturb.names'"),
    ("  data.seq_len:", "  data:", "sweep parameter 'data' is a config section"),
    ("[[magnitude], [grad_x_weight]]", "[magnitude, grad_x_weight]",
     "sweep parameter 'score.metrics' is magnitude in the W&B config but the run uses [magnitude]"),
])
def test_dry_run_refuses_alias_section_and_scalar_list_params(tmp_path, capsys, old, new, message):
    text = (ROOT / "sweeps" / "smoke.yaml").read_text()
    assert old in text
    (tmp_path / "bad.yaml").write_text(text.replace(old, new))
    assert commands.main(["sweep", str(tmp_path / "bad.yaml"), "--dry-run", "--sweep-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("param, value, arg", [("metric", "magnitude", "--metric=magnitude"),
                                               ("score.metrics", "magnitude", "--score.metrics=magnitude")])
def test_agent_run_with_a_bad_param_refuses_before_anything(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                            param, value, arg):
    from wandb.sdk.lib import config_util

    pfile = tmp_path / "wandb" / "sweep-s1" / "config-r1.yaml"
    config_util.save_config_file_from_dict(str(pfile), {param: {"value": value}})
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(pfile))
    monkeypatch.setenv("SUPERWEIGHT_SWEEP_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr("wandb.init", lambda *a, **k: pytest.fail("a W&B run was created"))
    assert commands.main(["run", f"model.name={tiny_model_dir}", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"wandb agent: sweep parameter '{param}'" in err, err
    assert not (tmp_path / "root").exists()


@pytest.fixture(scope="module")
def two_run_sweep(tiny_model_dir, tmp_path_factory):
    """sweeps/smoke.yaml on the tiny model: one metric and seed, two perturbations = 2 runs sharing one
    score set (score.cache=full: a compact set is keyed by the run's candidate sets, which name its
    perturbations, so two perturbations share none), run by `superweight sweep`; then its first parameter
    set once more, started as wandb agent starts a run."""
    tmp = tmp_path_factory.mktemp("agent")
    s = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    s["parameters"].update({
        "model.name": {"value": str(tiny_model_dir)}, "score.metrics": {"value": ["magnitude"]},
        "perturb.names": {"values": [["zero"], ["sign_flip"]]}, "select.topk": {"value": [1]},
        "select.controls": {"value": ["random_k"]}, "select.control_draws": {"value": 1}, "seeds": {"value": [0]},
        "data.eval_windows": {"value": 2}, "data.calib_windows": {"value": 1}, "data.seq_len": {"value": 32},
        "plots": {"value": ["none"]}, "score.cache": {"value": "full"}})
    path = tmp / "smoke-tiny.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        fork_sweep_runs(mp)  # each run in a process forked from a warm server, not a cold interpreter
        assert commands.main(["sweep", str(path), "--sweep-dir", str(tmp / "local")]) == 0
    plan = json.loads((tmp / "local" / "sweep.json").read_text())
    params = plan["runs"][0]["params"]
    # the agent: its parameter file (wandb's writer), its env, its command line, a new process group
    from wandb.sdk.lib import config_util

    pfile = tmp / "agent" / "wandb" / "sweep-simsweep1" / "config-simrun01.yaml"
    config_util.save_config_file_from_dict(str(pfile), {k: {"value": v} for k, v in params.items()})
    cmd = agent_command(s, params)
    proc = subprocess.run(cmd, env=agent_env(WANDB_SWEEP_ID="simsweep1", WANDB_RUN_ID="simrun01",
                                             WANDB_SWEEP_PARAM_PATH=str(pfile), WANDB_DIR=str(tmp / "agent"),
                                             SUPERWEIGHT_SWEEP_ROOT=str(tmp / "agent" / "outputs")),
                          cwd=tmp / "agent", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          process_group=0, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    agent_runs = list((tmp / "agent" / "outputs" / "simsweep1").iterdir())
    return {"plan": plan, "cmd": cmd, "agent_out": agent_runs, "sweep": s,
            "local": [records(r["out_dir"]) for r in plan["runs"]], "agent": records(agent_runs[0])}


def test_agent_and_local_sweep_record_the_same_config(two_run_sweep):
    local, agent = two_run_sweep["local"][0], two_run_sweep["agent"]
    assert len(local) == 1 and len(agent) == 1
    lc, ac = local[0]["config"], agent[0]["config"]
    print("\nagent command:", " ".join(two_run_sweep["cmd"]))
    print("agent config:", json.dumps(ac, sort_keys=True))
    print("local config:", json.dumps(lc, sort_keys=True))
    assert ac == lc
    # flat dotted keys, the run's own values (not the sweep's shapes), nothing machine-local
    assert ac["score.metrics"] == ["magnitude"] and ac["perturb.names"] == ["zero"] and ac["select.topk"] == [1]
    assert ac["seeds"] == [0] and ac["plots"] == ["none"] and ac["model.name"] == lc["model.name"]
    assert not {"out_dir", "cache_dir", "wandb.dir", "wandb.group", "model", "perturb", "metric"} & set(ac)
    assert {k for k in ac if not k.startswith("axis_")} == set(run_config(parse_config([])))
    # the swept axes as undotted scalars: the four the runs table always has, and each swept result key
    assert ac["axis_metric"] == "magnitude" and ac["axis_perturbation"] == "zero" and ac["axis_seed"] == 0
    assert ac["axis_data_eval_windows"] == 2 and "axis_plots" not in ac  # plots: no result key
    assert "axis_perturb_names" not in ac and "axis_wandb_requeue_on_sigterm" not in ac
    # the agent's run: its id, its sweep, out_dir under $SUPERWEIGHT_SWEEP_ROOT/<sweep id>/
    assert agent[0]["run"]["run_id"] == "simrun01" and agent[0]["run"]["sweep_id"] == "simsweep1"
    assert agent[0]["exit_code"] == 0 and local[0]["exit_code"] == 0
    assert local[0]["run"]["run_id"] == two_run_sweep["plan"]["runs"][0]["run_id"]
    assert local[0]["run"]["run_group"] == two_run_sweep["plan"]["group"]
    assert "sweep_id" not in local[0]["run"]  # a local sweep has no id on the W&B server


def test_two_runs_sharing_a_score_set_log_one_digest(two_run_sweep):
    plan, recs = two_run_sweep["plan"], [r[0] for r in two_run_sweep["local"]]
    print()
    for r, rec in zip(plan["runs"], recs):
        for a in rec["artifacts"]:
            print(f"{r['run_id']} {a['type']:9s} {a['name']:28s} {a['digest']} {sorted(a['aliases'])}")
    scores = [[a for a in rec["artifacts"] if a["type"] == "scores"] for rec in recs]
    assert all(len(s) == 1 for s in scores)
    a, b = scores[0][0], scores[1][0]
    key = a["metadata"]["cache_key"]
    model = Path(plan["runs"][0]["params"]["model.name"]).name
    assert a["name"] == b["name"] == f"scores-{model}-magnitude"
    assert a["digest"] == b["digest"] and b["metadata"]["cache_key"] == key
    assert sorted(a["aliases"]) == sorted(b["aliases"]) == [f"key-{key}", "latest"]
    assert a["tags"] == b["tags"] == ["seed-0"]
    for r, rec in zip(plan["runs"], recs):
        assert rec["summary"]["inputs/magnitude.seed0"] == f"{a['name']}:key-{key}"
        outs = {x["type"]: x for x in rec["artifacts"] if x["type"] not in ("scores", "run_table")}
        assert set(outs) == {"results", "rankings", "manifest"}
        chash = rec["summary"]["meta/config_hash"]
        for x in outs.values():
            assert x["name"] == f"{x['type']}-{model}"
            assert sorted(x["aliases"]) == ["latest", f"run-{r['run_id']}"]  # labels many versions share: tags
            assert x["tags"] == [f"cfg-{chash}", f"sweep-{plan['group']}", "seed-0"]
            assert x["metadata"]["sweep_id"] == plan["group"] and x["metadata"]["seeds"] == [0]
    # the two runs' results differ (two perturbations), their score set does not
    res = [next(x for x in rec["artifacts"] if x["type"] == "results") for rec in recs]
    assert res[0]["name"] == res[1]["name"] and res[0]["digest"] != res[1]["digest"]


# ---------------------------------------------------------------------------------------------------
# live
# ---------------------------------------------------------------------------------------------------
def test_live_run_one_step_per_row_plots_in_the_last(tiny_model_dir, tmp_path):
    out = tmp_path / "live"
    assert run(tiny_model_dir, out, "select.topk=1,2", "plots=json") == 0
    (rec,) = records(out)
    n = sum(1 for line in (out / ".progress.jsonl").read_text().splitlines() if '"row"' in line)
    assert n == 4 and len(rec["history"]) == n
    assert [h["row"] for h in rec["history"]] == [1, 2, 3, 4]
    assert all(h["progress"] == h["row"] / n and "row/delta_ppl" in h for h in rec["history"])
    charts = {k.split(".")[0] for k in rec["history"][-1] if k.startswith("charts/")}
    assert "charts/delta_ppl_vs_k" in charts  # the final plots, in the last row's step
    assert not any(k.startswith("charts/") for h in rec["history"][:-1] for k in h)
    s = rec["summary"]
    for k in ("stage/load_s", "stage/data_s", "stage/total_s", "headline/max_delta_ppl_top_k",
              "headline/max_delta_ppl_random_k", "baseline/ppl", "meta/config_hash", "inputs/magnitude.seed0"):
        assert k in s, k
    assert rec["exit_code"] == 0 and not rec["preempting"]
    assert {k: v for k, v in rec["config"].items() if not k.startswith("axis_")} == json.loads(json.dumps(run_config(parse_config(
        [f"model.name={tiny_model_dir}", *TINY, "select.topk=1,2", "plots=json"]))))
    # figures read a finished offline record back from its artifacts
    from superweight.edge.figures import materialize_offline_run

    got = materialize_offline_run(offline_run_dirs(out / "wandb")[0], tmp_path / "fig")
    assert (got / "results.csv").read_text() == (out / "results.csv").read_text()


def test_record_reader_matches_wandbs_own(tiny_model_dir, tmp_path):
    """read_offline_run parses the .wandb log itself; `wandb leet inspect --json` (wandb's reader) agrees."""
    out = tmp_path / "r"
    assert run(tiny_model_dir, out) == 0
    (d,) = offline_run_dirs(out / "wandb")
    mine = read_offline_run(d)
    exe = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(exe), "leet", "inspect", "--json", str(next(d.glob("run-*.wandb")))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # wandb ships `leet`: a failure here is a failure, not a skip
    theirs = {"config": {}, "history": [], "artifacts": [], "exit": None}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            t, body = r.get("type"), r.get(r.get("type"), {})
            if t in ("run", "config"):
                theirs["config"].update((body.get("config", body) or {}).get("update", {}))
            elif t == "history":
                theirs["history"].append(body.get("item", {}))
            elif t == "artifact":
                theirs["artifacts"].append((body["name"], body["digest"], sorted(body.get("aliases", []))))
            elif t == "exit":
                theirs["exit"] = body.get("exit_code", 0)
    theirs["config"].pop("_wandb", None)
    assert mine["config"] == theirs["config"]
    assert [h["row"] for h in mine["history"]] == [h["row"] for h in theirs["history"]]
    assert [(a["name"], a["digest"], sorted(a["aliases"])) for a in mine["artifacts"]] == theirs["artifacts"]
    assert mine["exit_code"] == theirs["exit"] == 0


# ---------------------------------------------------------------------------------------------------
# stops
# ---------------------------------------------------------------------------------------------------
def _rows(out) -> int:
    p = Path(out) / ".progress.jsonl"
    return sum(1 for line in p.read_text().splitlines() if line.startswith('{"key": ["row"')) if p.exists() else 0


def test_sigterm_requeue_marks_preempting_and_the_rerun_finishes_the_same_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pre"
    args = [f"model.name={tiny_model_dir}", *TINY, "select.topk=1,2,3,4,5,6,7,8", "select.controls=random_k,bottom_k",
            "select.control_draws=2", "data.eval_windows=8", "data.seq_len=64", f"out_dir={out}",
            "wandb.requeue_on_sigterm=true"]  # 32 rows
    # its own process (forked from a warm fork server, not this one), stopped from outside with a real SIGTERM
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SERVICE": "", "WANDB_SWEEP_ID": "",
           "WANDB_RUN_ID": "", "WANDB_SWEEP_PARAM_PATH": ""}
    proc = start_forked(["run", *args], env, str(tmp_path / "stdout"), str(tmp_path / "stderr"))
    t0 = time.time()
    while _rows(out) < 2 and proc.is_alive() and time.time() - t0 < 900:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(timeout=300)
    stderr = (tmp_path / "stderr").read_text()
    done = _rows(out)
    assert proc.exitcode == 143, stderr[-2000:]
    assert 2 <= done < 32
    assert "SIGTERM after" in stderr and "marked preempting" in stderr
    (first,) = records(out)
    n = len(first["history"])
    note = (f"SIGTERM record: {n} history rows ({done} in .progress.jsonl), preempting={first['preempting']}, "
            f"exit_code={first['exit_code']}, run id {first['run']['run_id']}")
    assert first["preempting"] and first["exit_code"] == 143
    assert done - 1 <= n <= done and [h["row"] for h in first["history"]] == list(range(1, n + 1))
    assert first["summary"]["meta/stopped"] == "SIGTERM, marked preempting (requeued)"
    from superweight.edge.figures import materialize_offline_run

    with pytest.raises(ConfigError, match="exit code 143"):
        materialize_offline_run(offline_run_dirs(out / "wandb")[0], tmp_path / "fig")
    # the rerun: same command, same W&B run id (out_dir/wandb_run.json), rows resumed from .progress.jsonl
    assert commands.main(["run", *args]) == 0
    assert "resuming: " in capsys.readouterr().out
    first_again, second = records(out)
    with capsys.disabled():
        print(f"\n{note}\nrerun: run id {second['run']['run_id']}, {len(second['history'])} history rows, "
              f"exit_code={second['exit_code']}")
    assert second["run"]["run_id"] == first["run"]["run_id"] == json.loads((out / "wandb_run.json").read_text())["id"]
    assert second["exit_code"] == 0 and not second["preempting"]
    assert [h["row"] for h in second["history"]] == list(range(1, 33))  # offline: the rerun's record is complete
    assert "meta/stopped" not in second["summary"]  # the first attempt's end is not this run's (removed at start)
    # `wandb sync <out_dir>/wandb` (wandb's own file selection) uploads exactly the complete record
    from wandb.cli import beta_sync

    picked = beta_sync._find_wandb_files([out / "wandb"], skip_synced=True, skip_online=True, verbose=False)
    assert [p.resolve().parent for p in picked] == [offline_run_dirs(out / "wandb")[1].resolve()]
    assert [h["row"] for h in read_offline_run(next(iter(picked)))["history"]] == list(range(1, 33))


LOG_ROW = WandbTracker.log_row


def _kill_at_row(monkeypatch, row: int, sig):
    """Send sig to this process right after the tracker logged row `row` (as a kill from outside would)."""
    def log_row(self, r, done, total):
        LOG_ROW(self, r, done, total)
        if done == row:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(WandbTracker, "log_row", log_row)


def test_sigterm_without_requeue_and_ctrl_c(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stop"
    _kill_at_row(monkeypatch, 1, signal.SIGTERM)
    assert run(tiny_model_dir, out) == 143
    (rec,) = records(out)
    assert rec["exit_code"] == 143 and not rec["preempting"] and rec["summary"]["meta/stopped"] == "SIGTERM"
    assert len(rec["history"]) == 1
    err = capsys.readouterr().err
    assert "SIGTERM after 1/2 rows: run stopped, not requeued; rerun the same command to resume" in err
    # Ctrl-C on the rerun: one line saying how to resume, exit 130, the same W&B run
    _kill_at_row(monkeypatch, 2, signal.SIGINT)
    assert run(tiny_model_dir, out) == 130
    lines = [ln[ln.index("superweight:"):] for ln in capsys.readouterr().err.splitlines() if "superweight:" in ln]
    assert lines == [f"superweight: interrupted after 2/2 rows; rerun the same command to resume (out_dir {out})"]
    first, second = records(out)
    assert second["run"]["run_id"] == first["run"]["run_id"] and second["exit_code"] == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_ui_stop_and_preemption_take_different_paths(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A Stop in the W&B UI reaches the run through wandb's run-stop checker, which calls
    wandb.sdk.lib.interrupt.interrupt_main from its thread (SIGINT to the main thread): exit 130, never marked
    preempting, so W&B does not requeue it, even with wandb.requeue_on_sigterm. A SIGTERM (preempted VM)
    with it: marked preempting, exit 143, requeued."""
    import threading

    from wandb.sdk.lib import interrupt

    def stop_from_ui(self, r, done, total):
        LOG_ROW(self, r, done, total)
        if done == 1:  # the stop checker's thread fires while the main thread works
            t = threading.Thread(target=interrupt.interrupt_main)
            t.start()
            t.join()
            time.sleep(0.5)  # the main thread takes the signal at its next bytecode

    monkeypatch.setattr(WandbTracker, "log_row", stop_from_ui)
    assert run(tiny_model_dir, tmp_path / "ui", "wandb.requeue_on_sigterm=true") == 130
    (ui,) = records(tmp_path / "ui")
    assert ui["exit_code"] == 130 and not ui["preempting"]
    assert ui["summary"]["meta/stopped"] == "SIGINT (Ctrl-C or a W&B UI Stop), not requeued"
    _kill_at_row(monkeypatch, 1, signal.SIGTERM)
    assert run(tiny_model_dir, tmp_path / "vm", "wandb.requeue_on_sigterm=true") == 143
    (vm,) = records(tmp_path / "vm")
    assert vm["exit_code"] == 143 and vm["preempting"]
    assert "marked preempting, W&B requeues it" in capsys.readouterr().err


def test_sigterm_after_the_run_finished_exits_0_and_says_so(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from superweight.edge.sweep import is_finished

    close = WandbTracker._supersede_offline

    def late(self):  # runs inside the shield right after run.finish(): the W&B run is complete
        os.kill(os.getpid(), signal.SIGTERM)
        close(self)

    monkeypatch.setattr(WandbTracker, "_supersede_offline", late)
    out = tmp_path / "late"
    assert run(tiny_model_dir, out, "wandb.requeue_on_sigterm=true") == 0
    err = capsys.readouterr().err
    assert "SIGTERM arrived after the run had finished and was published; nothing to resume or requeue" in err
    assert "preempting" not in err
    (rec,) = records(out)
    assert rec["exit_code"] == 0 and not rec["preempting"] and "meta/stopped" not in rec["summary"]
    assert is_finished(out, parse_config([f"model.name={tiny_model_dir}", *TINY, f"out_dir={out}",
                                          "wandb.requeue_on_sigterm=true"]))


def test_crash_marks_the_record_failed_with_the_error(tiny_model_dir, tmp_path, monkeypatch):
    def write(self, result):
        raise OSError("disk full")

    monkeypatch.setattr(RunOutputs, "write", write)
    with pytest.raises(OSError, match="disk full"):
        run(tiny_model_dir, tmp_path / "crash")
    (rec,) = records(tmp_path / "crash")
    assert rec["exit_code"] == 1 and rec["summary"]["meta/error"] == "OSError: disk full"
    assert len(rec["history"]) == 2  # the last row (left open for the plots) is flushed by the failed finish


def test_a_wandb_failure_exits_nonzero_unless_disabled(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import wandb

    def broken(*a, **k):
        raise wandb.errors.CommError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    assert run(tiny_model_dir, tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "W&B error: wandb.init failed: CommError: api.wandb.ai unreachable" in err
    assert run(tiny_model_dir, tmp_path / "b", "wandb.mode=disabled") == 0
    assert (tmp_path / "b" / "results.csv").exists() and not (tmp_path / "b" / "wandb").exists()
    # publishing fails after the results are on disk: exit 1, the record failed, the files kept
    monkeypatch.undo()

    def publish(self, result, files):
        raise wandb.errors.CommError("upload failed")

    monkeypatch.setattr(WandbTracker, "_publish", publish)
    assert run(tiny_model_dir, tmp_path / "c") == 1
    assert "W&B error: publishing to W&B failed: CommError: upload failed" in capsys.readouterr().err
    assert (tmp_path / "c" / "results.csv").exists()
    (rec,) = records(tmp_path / "c")
    assert rec["exit_code"] == 1 and "upload failed" in rec["summary"]["meta/error"]


def test_shield_defers_a_signal_until_the_wandb_call_returns():
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with signals.shielded():
            signals.interrupt(KeyboardInterrupt())  # as a handler would, mid-call
            seen.append("call finished")
    assert seen == ["call finished"]
    with signals.shielded(drop=True):
        signals.interrupt(KeyboardInterrupt())  # while closing the run: dropped
    with pytest.raises(KeyboardInterrupt):  # a second signal while one waits raises at once
        with signals.shielded():
            signals.interrupt(KeyboardInterrupt())
            signals.interrupt(KeyboardInterrupt())


# ---------------------------------------------------------------------------------------------------
# figures from W&B
# ---------------------------------------------------------------------------------------------------
class _Art:
    def __init__(self, type_, version):
        self.type, self.version = type_, f"v{version}"

    def download(self, root):
        Path(root).mkdir(parents=True, exist_ok=True)
        name = {"results": "results.csv", "rankings": "rankings.csv", "manifest": "manifest.json"}[self.type]
        Path(root, name).write_text(f"{self.type} {self.version}")


class _Run:
    def __init__(self, id_, state, arts):
        self.id, self.state, self.config, self._arts = id_, state, {"model.name": "m"}, arts

    def logged_artifacts(self):
        return iter(self._arts)


class _Api:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return iter(self._runs)


def test_figures_download_finished_runs_and_latest_versions(tmp_path, capsys):
    from superweight.edge.figures import download_wandb_runs

    api = _Api([_Run("a", "finished", [_Art("results", 3), _Art("results", 12), _Art("results", 7),
                                       _Art("manifest", 0), _Art("scores", 9)]),
                _Run("b", "preempted", [_Art("results", 1)]), _Run("c", "finished", [_Art("manifest", 0)])])
    dirs = download_wandb_runs("ent/proj/grp", tmp_path, sweep="sw1", api=api)
    assert api.calls == [("ent/proj", {"group": "grp", "sweep": "sw1"})]
    assert dirs == [tmp_path / "a"]
    assert (tmp_path / "a" / "results.csv").read_text() == "results v12"
    assert not (tmp_path / "b").exists()
    err = capsys.readouterr().err.splitlines()  # every skipped run named, with the reason
    assert err == ["superweight: skipped W&B run b (b): state preempted (the sweep requeues it; it counts once a "
                   "rerun finishes)", "superweight: skipped W&B run c (c): finished without a results artifact"]
    with pytest.raises(ConfigError, match="no finished W&B runs.*1 skipped"):
        download_wandb_runs("ent/proj", tmp_path / "x", api=_Api([_Run("b", "crashed", [_Art("results", 1)])]))
    # --sweep as `wandb sweep` prints it: ENTITY/PROJECT/ID, with or without a wandb: source
    api = _Api([_Run("a", "finished", [_Art("results", 1)])])
    assert download_wandb_runs("", tmp_path / "y", sweep="ent/proj/sw2", api=api) == [tmp_path / "y" / "a"]
    assert api.calls == [("ent/proj", {"sweep": "sw2"})]
    with pytest.raises(ConfigError, match="--sweep 'ent/other/sw2' is in ent/other, the source is wandb:ent/proj"):
        download_wandb_runs("ent/proj", tmp_path / "z", sweep="ent/other/sw2", api=_Api([]))


def test_figures_sweep_path_alone_names_the_project(tmp_path, monkeypatch):
    from superweight.edge import figures

    seen = []

    def fake(spec, dest, sweep=None, api=None):
        seen.append((spec, sweep))
        raise ConfigError("stop here")

    monkeypatch.setattr(figures, "download_wandb_runs", fake)
    assert commands.main(["figures", "--sweep", "ent/proj/sw3", "--out", str(tmp_path / "f")]) == 2
    assert seen == [("", "ent/proj/sw3")]


def test_phase1_header_names_its_controls_and_run_count():
    """The header comment says which controls each run has and how many runs a model gets: both follow the YAML."""
    import re

    text = (ROOT / "sweeps" / "phase1.yaml").read_text()
    s = sweep.load_sweep(ROOT / "sweeps" / "phase1.yaml")
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    names = {"random_k": "Random-K", "bottom_k": "Bottom-K", "matched_k": "Matched-K"}
    controls = s["parameters"]["select.controls"]["value"]
    assert all(names[c] in header for c in controls)
    assert all(names[c] in s["description"] for c in controls)
    per_model = len(sweep.expand(s)) // len(s["parameters"]["model.name"]["values"])
    assert int(re.search(r"= (\d+) runs per model", header).group(1)) == per_model


def test_a_signal_deferred_during_a_failing_wandb_call_is_not_lost():
    """A SIGTERM that arrives while a shielded W&B call then fails is raised, chained from the failure, so the
    run still closes as preempted (requeued) instead of the failure path dropping the signal."""
    with pytest.raises(signals.Preempted) as caught:
        with signals.shielded():
            signals.interrupt(signals.Preempted())  # as the SIGTERM handler would, mid-call
            raise RuntimeError("W&B call failed")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert signals._SHIELD == {"depth": 0, "pending": None}
    with pytest.raises(RuntimeError):  # while closing the run (drop=True) the signal is still discarded
        with signals.shielded(drop=True):
            signals.interrupt(signals.Preempted())
            raise RuntimeError("finish failed")
    assert signals._SHIELD == {"depth": 0, "pending": None}


def test_the_agents_stop_command_is_the_sigterm_of_a_preemption():
    """README (Stops and preemption): under `wandb agent`, a run the sweep controller stops gets SIGTERM from the
    agent (Agent._command_stop -> AgentProcess.terminate), the same signal a preempted VM sends, so the run
    cannot tell the two apart. Pinned to the installed wandb: its own stop command, on a real child process."""
    import sys

    from wandb import wandb_agent

    proc = wandb_agent.AgentProcess(command=[sys.executable, "-c", "import time; time.sleep(60)"],
                                    env=dict(os.environ))
    proc.last_sigterm_time = None
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)  # only the command handler, no server
    agent._run_processes, agent._kill_delay = {"run1": proc}, 30
    try:
        agent._command_stop({"run_id": "run1"})
        proc.wait(timeout=30)
        assert proc.poll() == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
