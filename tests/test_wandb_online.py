"""Online paths of the tracker, which no W&B server here can exercise, against a fake wandb.init whose run
records every call: the resumed summary loses the earlier attempt's end, a refused (deleted) run id gives a
new recorded id after one refusal, score sets are looked up by their key before anything is logged, output
labels are the same as offline, and the run is named, grouped and given its axis keys as the runs table
shows them. Also: `--_wandb=...` (W&B's key in resume commands) is accepted and ignored."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from superweight.arguments import FIELDS, ALIASES, parse_config
from superweight.edge import tracking
from superweight.edge.run_identity import run_name
from superweight.edge.sweep import agent_params, write_param_file


class FakeSummary(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.removed = []

    def __delitem__(self, key):
        self.removed.append(key)
        self.pop(key, None)  # wandb sends a remove record whether or not the key is there


class FakeArt:
    def __init__(self, name):
        self.name, self.waited = name, False

    def wait(self):
        self.waited = True
        return self


class FakeRun:
    def __init__(self, calls, run_id, summary, tmp):
        self.calls, self.id, self.project, self.entity = calls, run_id, "superweight", "ent"
        self.url, self.resumed, self.starting_step = f"https://w/{run_id}", bool(summary), 0
        self.summary, self.dir = FakeSummary(summary), str(tmp / "wandb" / f"run-{run_id}" / "files")
        self.missing = "\0"  # use_artifact(name) of a name ending so: not found

    def define_metric(self, *a, **k):
        pass

    def log(self, data, commit=True):
        self.calls.append(("log", sorted(data)))

    def log_artifact(self, art, aliases=None, tags=None):
        self.calls.append(("log_artifact", art.name, art.type, sorted(aliases or []), list(tags or []),
                           [e.ref for e in art.manifest.entries.values() if e.ref]))
        return FakeArt(art.name)

    def use_artifact(self, art, type=None, aliases=None):
        name = art if isinstance(art, str) else art.name
        self.calls.append(("use_artifact", name))
        if isinstance(art, str) and name.endswith(self.missing):
            raise ValueError(f"artifact {name} not found")
        return art

    def mark_preempting(self):
        self.calls.append(("mark_preempting",))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


def refusal(run_id: str) -> BaseException:
    """What wandb.init raises for a deleted run's id: wandb-core's ErrorInfo (code COMMUNICATION, the server's
    GraphQL message) turned into an exception by wandb's own handler, as wandb_init.py does."""
    from wandb.errors.util import ProtobufErrorHandler
    from wandb.proto import wandb_internal_pb2 as pb

    return ProtobufErrorHandler.to_exception(pb.ErrorInfo(
        code=pb.ErrorInfo.COMMUNICATION, message=f"run {run_id} was previously created and deleted; try a new run name"))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    import wandb

    state = {"calls": [], "refuse": set(), "summary": {}}

    def init(**kw):
        state["calls"].append(("init", kw))
        if kw.get("id") in state["refuse"]:
            raise refusal(kw["id"])
        return FakeRun(state["calls"], kw.get("id") or "newid123", state["summary"], tmp_path)

    monkeypatch.setattr(wandb, "init", init)
    for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "SUPERWEIGHT_SWEEP_GROUP"):
        monkeypatch.delenv(k, raising=False)
    return state


def _tracker(tmp_path, *argv):
    cfg = parse_config([f"out_dir={tmp_path / 'out'}", "wandb.mode=online", *argv])
    (tmp_path / "out").mkdir(exist_ok=True)
    return cfg, tracking.WandbTracker(cfg, cfg.out_dir)


EXP = SimpleNamespace(chash="c" * 16, log=SimpleNamespace(done={}))


def test_resumed_summary_loses_the_earlier_attempts_end(fake, tmp_path):
    fake["summary"] = {"meta/stopped": "SIGTERM, marked preempting (requeued)", "meta/error": "OSError: x",
                       "baseline/ppl": 3.0}
    _, t = _tracker(tmp_path)
    t.start(EXP)
    assert t.run.summary.removed == ["meta/stopped", "meta/error"]
    assert "meta/stopped" not in t.run.summary and "meta/error" not in t.run.summary
    assert t.run.summary["baseline/ppl"] == 3.0  # what still applies stays (and is overwritten at the end)


def test_a_refused_run_id_gives_a_new_recorded_id_after_one_try(fake, tmp_path, capsys):
    cfg, t = _tracker(tmp_path)
    (Path(cfg.out_dir) / "wandb_run.json").write_text(json.dumps({"id": "deleted1", "config_hash": EXP.chash}))
    fake["refuse"] = {"deleted1"}
    t.start(EXP)
    inits = [c[1] for c in fake["calls"] if c[0] == "init"]
    assert [i.get("id") for i in inits] == ["deleted1", None]  # one refusal, then a new id: no retry loop
    info = json.loads((Path(cfg.out_dir) / "wandb_run.json").read_text())
    assert info["id"] == "newid123" and info["refused_ids"] == ["deleted1"]
    assert "W&B refused run id deleted1" in capsys.readouterr().err
    # the next attempt does not offer the refused id again: it resumes the new one
    t2 = tracking.WandbTracker(cfg, cfg.out_dir)
    t2.start(EXP)
    assert [c[1].get("id") for c in fake["calls"] if c[0] == "init"][-1] == "newid123"
    # any other init failure is not a refusal: one line, no second init
    fake["calls"].clear()
    fake["refuse"] = set()
    import wandb

    def unreachable(**kw):
        fake["calls"].append(("init", kw))
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop")

    wandb.init = unreachable
    with pytest.raises(tracking.TrackingError, match="wandb.init failed: CommError: Network error"):
        tracking.WandbTracker(cfg, cfg.out_dir).start(EXP)
    assert len(fake["calls"]) == 1


def test_sigterm_during_a_failing_log_marks_the_run_preempting(fake, tmp_path):
    """SIGTERM arrives inside run.log, which then fails: the run is still marked preempting (requeued), the
    failure kept as the signal's cause, and nothing is left pending for a later shield."""
    from superweight.edge import signals

    _, t = _tracker(tmp_path, "wandb.requeue_on_sigterm=true")
    t.start(EXP)

    def log(data, commit=True):
        signals.interrupt(signals.Preempted())  # the SIGTERM handler, mid-call
        raise RuntimeError("W&B log failed")

    run = t.run
    run.log = log
    with pytest.raises(signals.Preempted) as caught:
        try:
            t.log_row({"metric": "magnitude"}, 1, 4)
        except BaseException as e:  # as Experiment.run does
            t.fail(e)
            raise
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert ("mark_preempting",) in fake["calls"] and ("finish", 143) in fake["calls"] and t.marked_preempting
    assert run.summary["meta/stopped"].startswith("SIGTERM, marked preempting")


def test_only_wandbs_refusal_of_a_deleted_id_counts_as_refused():
    """A 409, "conflict" or "deleted" in some other error (an artifact upload, a network retry, a usage error)
    is not W&B refusing the run id: only the CommError wandb.init raises with the server's message is."""
    import wandb

    assert isinstance(refusal("abc"), wandb.errors.CommError) and tracking.refused_id(refusal("abc"))
    for other in (wandb.errors.CommError("HTTP 409 Conflict uploading artifact results-model"),
                  wandb.errors.CommError("Network error (ConnectionError), entering retry loop"),
                  wandb.errors.UsageError("run was deleted from the project; conflict"),
                  wandb.errors.AuthenticationError("run was previously created and deleted"),
                  RuntimeError("run abc was previously created and deleted; try a new run name")):
        assert not tracking.refused_id(other), other


def test_name_group_and_axis_keys_under_an_agent(fake, tmp_path, monkeypatch):
    params = {"perturb.prob": 0.01, "perturb.bits": "sign", "seeds": [2], "score.metrics": ["grad_x_weight"]}
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(write_param_file(tmp_path / "p" / "config-r.yaml", params)))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    _, t = _tracker(tmp_path, "perturb.names=bit_flip", "perturb.prob=0.01", "perturb.bits=sign", "seeds=2",
                    "score.metrics=grad_x_weight", "select.topk=1,10", "model.dtype=float16")
    t.start(EXP)
    kw = next(c[1] for c in fake["calls"] if c[0] == "init")
    assert kw["name"] == "grad_x_weight bit_flip(bits=sign,prob=0.01) seed2 K1,10 smollm2-135m float16"
    assert kw["group"] == "grad_x_weight bit_flip(bits=sign,prob=0.01) K1,10 smollm2-135m float16"
    assert kw["job_type"] == "experiment" and "id" not in kw and "project" not in kw  # the agent's
    axes = {k: v for k, v in kw["config"].items() if k.startswith("axis_")}
    assert axes == {"axis_metric": "grad_x_weight", "axis_perturbation": "bit_flip", "axis_seed": 2,
                    "axis_k": "1,10", "axis_model": "smollm2-135m", "axis_perturb_prob": 0.01,
                    "axis_perturb_bits": "sign"}
    for k in axes:  # never an option or alias, so the agent can never pass one back
        assert k not in FIELDS and k not in ALIASES and "." not in k


def test_online_score_sets_are_looked_up_before_anything_is_logged(fake, tmp_path, monkeypatch):
    """Output labels as offline (alias run-<id>, tags); a score set another run logged is only used; a new
    key is logged once (a reference, no upload) and then used."""
    cache = tmp_path / "cache"
    (cache / "scores").mkdir(parents=True)
    for key in ("kfound", "knew"):
        (cache / "scores" / f"{key}.safetensors").write_bytes(b"x" * 10)
    monkeypatch.setenv("SUPERWEIGHT_SWEEP_GROUP", "smoke-1234")
    cfg, t = _tracker(tmp_path, f"cache_dir={cache}", "seeds=0", "plots=none")
    t.start(EXP)
    t.run.missing = "key-knew"
    (Path(cfg.out_dir) / "results.csv").write_text("a,b\n1,2\n")
    table = pd.DataFrame({"perturbation": ["zero"], "mode": ["global"], "metric": ["magnitude"],
                          "selection": ["top_k"], "k": [1], "delta_nll": [float("inf")], "delta_ppl": [float("inf")]})
    result = SimpleNamespace(table=table, baseline={"ppl": 3.0}, gaps=pd.DataFrame(), config_hash=EXP.chash,
                             model={"fingerprint": "fp"},
                             extra={"score_keys": {"magnitude.seed0": "kfound", "grad_x_weight.seed0": "knew"}})
    t.finish(result, {"results": ["results.csv"]})
    calls = [c for c in fake["calls"] if c[0] != "init"]
    uses = [c[1] for c in calls if c[0] == "use_artifact"]
    assert uses == ["scores-smollm2-135m-magnitude:key-kfound", "scores-smollm2-135m-grad_x_weight:key-knew",
                    "scores-smollm2-135m-grad_x_weight"]  # found: used; not found: logged, then used
    logged = {c[2]: c for c in calls if c[0] == "log_artifact"}
    assert logged["scores"][3] == ["key-knew"] and logged["scores"][4] == ["seed-0"]
    assert logged["scores"][5] == [(cache / "scores" / "knew.safetensors").resolve().as_uri()]
    assert logged["results"][3] == ["run-newid123"]
    assert logged["results"][4] == [f"cfg-{EXP.chash}", "sweep-smoke-1234", "seed-0"]
    assert ("log", ["tables/results"]) in calls  # the CSV as a workspace table, in the final step
    assert t.run is None and ("finish", 0) in calls


def test_sweep_metric_is_finite_and_capped():
    inf = pd.DataFrame({"perturbation": ["z", "z", "z"], "mode": ["g"] * 3, "metric": ["m"] * 3,
                        "selection": ["top_k", "top_k", "random_k"], "k": [1, 10, 1],
                        "delta_nll": [float("inf"), 0.5, 99.0]})
    assert tracking.sweep_metric(inf) == tracking.SWEEP_NLL_CAP  # broken model: the cap, not null
    assert tracking.sweep_metric(inf.assign(delta_nll=[0.2, float("nan"), 99.0])) == tracking.SWEEP_NLL_CAP
    assert tracking.sweep_metric(inf.assign(delta_nll=[0.2, 0.7, 99.0])) == pytest.approx(0.7)  # Top-K only
    assert tracking.sweep_metric(inf.iloc[2:]) == 0.0


def test_wandb_resume_key_is_accepted_and_ignored(tmp_path):
    cfg = parse_config(["--_wandb={'code_path': 'x'}", "--seeds=3"])
    assert cfg.seeds == [3] and cfg == parse_config(["--seeds=3"])
    assert parse_config(["--_wandb", "{}", "seeds=3"]).seeds == [3]
    p = write_param_file(tmp_path / "config-r.yaml", {"seeds": [3], "_wandb": {"code_path": "x"}})
    assert agent_params({"WANDB_SWEEP_PARAM_PATH": str(p)}) == {"seeds": [3]}


def test_run_names_of_phase1_read_apart():
    names = [run_name(parse_config([f"score.metrics={m}", f"perturb.names={p}", f"seeds={s}",
                                    "select.topk=1,10,100,1000,10000"]))
             for m, p, s in [("magnitude", "zero", 0), ("grad_x_weight", "sign_flip", 1),
                             ("hutchinson_diag", "gauss_noise", 2), ("act_mag", "zero", 0),
                             ("act_outlier", "sign_flip", 2)]]
    print("\n" + "\n".join(names))
    assert names[1] == "grad_x_weight sign_flip seed1 K1,10,100,1000,10000 smollm2-135m"
    assert len(set(names)) == 5
