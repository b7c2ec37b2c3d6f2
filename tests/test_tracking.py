"""W&B tracking: one real tiny experiment logged offline, read back from its .wandb record log with
wandb's own reader (`wandb leet inspect --json`), and checked against the files of the out_dir."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from superweight import tracking
from superweight.config import parse_config
from superweight.experiment import Experiment, config_hash
from superweight.plots import chrome_available, jaccard_from_rankings

SECRETS = {"HF_TOKEN": "hf_TESTSECRETabcdef0123456789", "WANDB_API_KEY": "TESTSECRETwandbkey" + "7" * 22}


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    with tracking._env(**SECRETS):
        cfg = parse_config([f"model={tiny_model_dir}", f"out_dir={out}", "topk=1,10,100", "seeds=0,1",
                            "metric=magnitude,grad_x_weight", "data.eval_windows=4", "data.calib_windows=2",
                            "data.seq_len=32", "wandb.mode=offline", "wandb.group=test-group", "wandb.tags=a,b",
                            "wandb.name=tiny", "plots=html,png"])
        exp = Experiment(cfg, progress=False)
        exp.run()
    dirs = tracking.offline_run_dirs(out / "wandb")
    assert len(dirs) == 1
    return {"exp": exp, "cfg": cfg, "out": out, "rec": tracking.read_offline_run(dirs[0]), "run_dir": dirs[0]}


def test_config_is_the_full_dataclass_config(tracked):
    rec, cfg = tracked["rec"], tracked["cfg"]
    assert rec["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert rec["config"]["select"]["topk"] == [1, 10, 100]
    assert rec["config"]["score"]["metrics"] == ["magnitude", "grad_x_weight"]
    run = rec["run"]
    assert run["run_group"] == "test-group" and run["tags"] == ["a", "b"] and run["display_name"] == "tiny"
    assert run["project"] == "superweight" and rec["exit_code"] == 0


def test_summary_holds_baseline_and_headline_deltas(tracked):
    out, s = tracked["out"], tracked["rec"]["summary"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert s["baseline/ppl"] == pytest.approx(manifest["baseline"]["ppl"])
    assert s["baseline/nll"] == pytest.approx(manifest["baseline"]["nll"])
    rows = pd.read_csv(out / "results.csv").to_dict("records")
    # independent: plain loops over the CSV rows
    sums: dict = {}
    for r in rows:
        key = (r["perturbation"], r["mode"], r["metric"], r["selection"], r["k"])
        sums.setdefault(key, []).append(r["delta_ppl"])
    means = {k: sum(v) / len(v) for k, v in sums.items()}
    assert len(means) == 2 * 3 * 3
    for (p, m, metric, sel, k), v in means.items():
        assert s[f"delta_ppl/{p}/{m}/{metric}/{sel}/k{k}"] == pytest.approx(v, rel=1e-9, abs=1e-12)
        if sel == "top_k":
            gap = v - means[(p, m, metric, "random_k", k)]
            assert s[f"gap_ppl/{p}/{m}/{metric}/k{k}"] == pytest.approx(gap, rel=1e-9, abs=1e-12)
    for metric in ("magnitude", "grad_x_weight"):
        top = [v for (p, m, mt, sel, k), v in means.items() if mt == metric and sel == "top_k"]
        assert s[f"max_delta_ppl/{metric}"] == pytest.approx(max(top))
    assert s["headline/max_delta_ppl_random_k"] == pytest.approx(
        max(v for key, v in means.items() if key[3] == "random_k"))
    assert s["meta/config_hash"] == config_hash(tracked["cfg"])


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return (a is None or (isinstance(a, float) and math.isnan(a))) and (b is None or (isinstance(b, float) and math.isnan(b)))
        return a == pytest.approx(b, rel=1e-12, abs=1e-15)
    return a == b


def test_tables_equal_the_csv_files(tracked):
    out, tables = tracked["out"], tracked["rec"]["tables"]
    assert set(tables) == {"tables/results", "tables/rankings", "tables/stability"}
    for name in ("results", "rankings", "stability"):
        csv = pd.read_csv(out / f"{name}.csv")
        tab = tables[f"tables/{name}"]
        assert list(tab.columns) == list(csv.columns)
        assert len(tab) == len(csv) > 0
        for (_, a), (_, b) in zip(tab.iterrows(), csv.iterrows()):
            for c in csv.columns:
                bv = b[c].item() if hasattr(b[c], "item") else b[c]
                assert _same(a[c], bv), (name, c, a[c], bv)


def test_artifacts_hold_the_out_dir_files(tracked):
    out, arts = tracked["out"], tracked["rec"]["artifacts"]
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    by_type = {a["type"]: a for a in arts if a["type"] != "run_table"}
    assert set(by_type) == {"results", "rankings", "scores", "manifest", "plots"}
    for kind, a in by_type.items():
        assert a["name"] == f"{kind}-{run_id}"
        assert a["metadata"]["config_hash"] == config_hash(tracked["cfg"])
    assert set(by_type["results"]["files"]) == {"results.csv", "perturbation_results.json"}
    assert set(by_type["scores"]["files"]) == {"sensitivity_scores.safetensors"}
    for kind in ("results", "rankings", "scores"):
        for name, local in by_type[kind]["files"].items():
            assert open(local, "rb").read() == (out / name).read_bytes(), name
            assert str(local).startswith(str(out / "wandb" / "staging"))
    logged_manifest = json.loads(open(by_type["manifest"]["files"]["manifest.json"]).read())
    final = json.loads((out / "manifest.json").read_text())
    assert logged_manifest["wandb"]["id"] == run_id == final["wandb"]["id"]
    assert {k: v for k, v in final.items() if k != "published"} == logged_manifest
    assert "plots/delta_ppl_vs_k.html" in by_type["plots"]["files"]
    if not chrome_available():
        pytest.skip("no Chrome/Chromium for PNG export (apt-get install chromium)")
    pngs = {n for n in by_type["plots"]["files"] if n.endswith(".png")}
    assert "plots/delta_ppl_vs_k.png" in pngs and "plots/stability_seeds.png" in pngs
    for n in pngs:
        assert open(by_type["plots"]["files"][n], "rb").read() == (out / n).read_bytes()


def test_plots_logged_as_images_and_charts(tracked):
    s, run_dir = tracked["rec"]["summary"], tracked["run_dir"]
    assert s["charts/delta_ppl_vs_k._type"] == "plotly-file"
    if not chrome_available():
        pytest.skip("no Chrome/Chromium for PNG export (apt-get install chromium)")
    assert s["plots/delta_ppl_vs_k._type"] == "image-file"
    img = run_dir / "files" / s["plots/delta_ppl_vs_k.path"]
    assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["charts/layer_sensitivity._type"] == "plotly-file"


def test_nothing_secret_is_written(tracked):
    hits = []
    for p in tracked["out"].rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [(str(p), k) for k, v in SECRETS.items() if v.encode() in data]
    assert hits == []


def test_manifest_records_run_and_publication(tracked):
    from superweight.sweep import is_finished

    out = tracked["out"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["wandb"]["mode"] == "offline" and m["wandb"]["dir"] == str(tracked["run_dir"].resolve())
    assert m["published"]["wandb"] == "offline" and m["published"]["plots"] > 0
    assert is_finished(out, tracked["cfg"])


def test_rankings_jaccard_equals_stability_csv(tracked):
    out = tracked["out"]
    ranks, stab = pd.read_csv(out / "rankings.csv"), pd.read_csv(out / "stability.csv")
    for k in (1, 10, 100):
        ours = jaccard_from_rankings(ranks, k).set_index(["a", "b"])["jaccard"]
        ref = stab[(stab["k"] == k) & (stab["mode"] == "global")].set_index(["a", "b"])["jaccard"]
        assert len(ref) == 2 + 2  # 2 seed pairs (one per metric), 2 metric pairs (one per seed)
        for key, v in ref.items():
            assert ours[key] == pytest.approx(v)


def test_republishing_resumes_the_same_wandb_run(tracked, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tracked["out"], out, ignore=shutil.ignore_patterns("wandb"))
    first = json.loads((out / "wandb_run.json").read_text())
    info = tracking.log_run(tracked["cfg"], out, config_hash(tracked["cfg"]))
    assert info["id"] == first["id"] and info["mode"] == "offline"
    rec = tracking.read_offline_run(tracking.offline_run_dirs(out / "wandb")[0])
    assert rec["run"]["run_id"] == first["id"] and rec["run"].get("resume") is True
    # a different config hash starts a new W&B run
    info2 = tracking.log_run(tracked["cfg"], out, "0" * 16)
    assert info2["id"] != first["id"]


def test_disabled_mode_logs_nothing(tracked, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tracked["out"], out, ignore=shutil.ignore_patterns("wandb", "wandb_run.json"))
    cfg = parse_config([f"out_dir={out}", "wandb.mode=disabled"])
    assert tracking.log_run(cfg, out) == {"mode": "disabled"}
    assert not (out / "wandb").exists() and not (out / "wandb_run.json").exists()


def test_resolve_mode(tmp_path):
    empty_netrc = {"NETRC": str(tmp_path / "none")}
    assert tracking.resolve_mode("auto", empty_netrc) == "offline"
    assert tracking.resolve_mode("auto", {**empty_netrc, "WANDB_API_KEY": "x" * 40}) == "online"
    assert tracking.resolve_mode("auto", {**empty_netrc, "WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}) == "offline"
    assert tracking.resolve_mode("auto", {**empty_netrc, "WANDB_MODE": "disabled"}) == "disabled"
    assert tracking.resolve_mode("disabled", {"WANDB_API_KEY": "x" * 40}) == "disabled"
    assert tracking.resolve_mode("online", empty_netrc) == "online"
    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.resolve_mode("auto", {"NETRC": str(rc)}) == "online"
    assert tracking.resolve_mode("auto", {"NETRC": str(rc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_summary_metrics_on_a_synthetic_table():
    rows = []
    for seed, (t1, t10, r1, r10) in enumerate([(1.0, 50.0, 0.1, 0.2), (3.0, 70.0, -0.1, 0.4)]):
        for sel, k, d in [("top_k", 1, t1), ("top_k", 10, t10), ("random_k", 1, r1), ("random_k", 10, r10)]:
            rows.append({"perturbation": "zero", "mode": "global", "metric": "m", "selection": sel, "k": k,
                         "seed": seed, "delta_ppl": d, "delta_nll": d / 10, "delta_acc": -d / 100,
                         "ppl_ratio": (40 + d) / 40})
    rows.append({**rows[0], "selection": "bottom_k", "delta_ppl": np.inf, "ppl_ratio": np.inf})
    s = tracking.summary_metrics(pd.DataFrame(rows), {"ppl": 40.0, "nll": 3.7, "acc": 0.3})
    assert s["baseline/ppl"] == 40.0
    assert s["delta_ppl/zero/global/m/top_k/k10"] == pytest.approx(60.0)
    assert s["gap_ppl/zero/global/m/k10"] == pytest.approx(60.0 - 0.3)
    assert s["gap_ppl/zero/global/m/k1"] == pytest.approx(2.0 - 0.0)
    assert s["max_delta_ppl/m"] == pytest.approx(60.0)
    assert s["headline/k_to_double_ppl/m"] == 10  # mean ratio at K=10 is 100/40 >= 2, at K=1 it is 42/40
    assert s["delta_ppl/zero/global/m/bottom_k/k1"] is None  # non-finite -> None


def test_figures_read_an_offline_wandb_run_back(tracked, tmp_path):
    from superweight.figures import resolve_sources

    dirs = resolve_sources([str(tracked["run_dir"])], tmp_path)
    assert len(dirs) == 1
    for name in ("results.csv", "rankings.csv", "sensitivity_scores.safetensors", "manifest.json"):
        assert (dirs[0] / name).read_bytes() == (tracked["out"] / name).read_bytes() or name == "manifest.json"
    assert json.loads((dirs[0] / "manifest.json").read_text())["config"] == json.loads(json.dumps(tracked["cfg"].to_dict()))
