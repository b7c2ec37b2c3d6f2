"""W&B tracking: one real tiny experiment logged offline, read back from its .wandb record log, and checked
against the files of the out_dir (config, summary, artifacts with their tables, plots, resume of the same run)."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from superweight.edge import offline_runs, run_identity
from superweight.arguments import parse_config
from superweight.commands.run import make_experiment, run_experiment
from superweight.config import config_hash
from superweight.edge.plots import chrome_available
from superweight.resources import cache_root, code_version
from superweight.core.gaps import gaps
from superweight.core.stability import jaccard_from_rankings
from superweight.core.summary import summary_metrics

SECRETS = {"HF_TOKEN": "hf_TESTSECRETabcdef0123456789", "WANDB_API_KEY": "TESTSECRETwandbkey" + "7" * 22}
WHERE = ("out_dir", "cache_dir", "wandb.dir", "wandb.group")  # where a run ran: never in run.config


def chash(cfg) -> str:
    return config_hash(cfg, code_version())


def run(argv):
    cfg = parse_config(argv)
    exp = make_experiment(cfg, progress=False)
    return cfg, exp, run_experiment(exp)


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    mp = pytest.MonkeyPatch()
    try:
        for k, v in SECRETS.items():
            mp.setenv(k, v)
        argv = [f"model={tiny_model_dir}", f"out_dir={out}", "topk=1,10,100", "seeds=0,1",
                "metric=magnitude,grad_x_weight", "data.eval_windows=4", "data.calib_windows=2",
                "data.seq_len=32", "wandb.mode=offline", "wandb.group=test-group", "wandb.tags=a,b",
                "wandb.name=tiny", "plots=html,png", "score.cache=full"]  # full sets: one per (metric, calibration)
        cfg, exp, result = run(argv)
    finally:
        mp.undo()
    dirs = offline_runs.offline_run_dirs(out / "wandb")
    assert len(dirs) == 1
    return {"exp": exp, "cfg": cfg, "argv": argv, "result": result, "out": out,
            "rec": offline_runs.read_offline_run(dirs[0]), "run_dir": dirs[0]}


def test_config_is_the_flat_dotted_config(tracked):
    """run.config holds the flat dotted keys a sweep names, without the keys that say where a run ran."""
    rec, cfg = tracked["rec"], tracked["cfg"]
    def dotted(d, prefix=""):  # independent of config.to_flat: the dataclass tree, keys joined with dots
        for k, v in d.items():
            yield from dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    want = {k: v for k, v in dotted(dataclasses.asdict(cfg)) if k not in WHERE}
    axes = {k: v for k, v in rec["config"].items() if k.startswith("axis_")}
    assert {k: v for k, v in rec["config"].items() if k not in axes} == json.loads(json.dumps(want))
    # the swept axes as undotted scalars the runs table can group by (lists joined by ',')
    assert axes == {"axis_metric": "magnitude,grad_x_weight", "axis_perturbation": "zero", "axis_seed": "0,1",
                    "axis_k": "1,10,100", "axis_model": cfg.model.name.rstrip("/").split("/")[-1]}
    assert rec["config"]["select.topk"] == [1, 10, 100]
    assert rec["config"]["score.metrics"] == ["magnitude", "grad_x_weight"]
    assert rec["config"]["select.controls"] == ["random_k", "bottom_k", "matched_k"]  # the defaults
    assert not set(WHERE) & set(rec["config"])
    run = rec["run"]
    assert run["run_group"] == "test-group" and run["tags"] == ["a", "b"] and run["display_name"] == "tiny"
    assert run["project"] == "superweight" and rec["exit_code"] == 0
    s = rec["summary"]
    assert s["meta/out_dir"] == str(tracked["out"].resolve()) and s["meta/config_hash"] == chash(cfg)


def test_summary_holds_baseline_deltas_and_gaps(tracked):
    out, s = tracked["out"], tracked["rec"]["summary"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert s["baseline/ppl"] == pytest.approx(manifest["baseline"]["ppl"])
    assert s["baseline/nll"] == pytest.approx(manifest["baseline"]["nll"])
    rows = pd.read_csv(out / "results.csv").to_dict("records")
    # independent: plain loops over the CSV rows (means over seeds and control draws)
    sums: dict = {}
    for r in rows:
        for v in ("delta_ppl", "delta_nll"):
            sums.setdefault((v, r["perturbation"], r["mode"], r["metric"], r["selection"], r["k"]), []).append(r[v])
    means = {k: sum(v) / len(v) for k, v in sums.items()}
    assert len(means) == 2 * 2 * 4 * 3  # values x metrics x selections x K
    for (v, p, m, metric, sel, k), x in means.items():
        assert s[f"{v}/{p}/{m}/{metric}/{sel}/k{k}"] == pytest.approx(x, rel=1e-9, abs=1e-12)
    gp = pd.read_csv(out / "gaps.csv")
    assert len(gp) == 2 * 3 * 3  # metrics x K x controls
    for g in gp.itertuples():
        key = f"gap_nll/{g.perturbation}/{g.mode}/{g.metric}/{g.control}/k{g.k}"
        top = means[("delta_nll", g.perturbation, g.mode, g.metric, "top_k", g.k)]
        ctl = means[("delta_nll", g.perturbation, g.mode, g.metric, g.control, g.k)]
        assert s[key] == pytest.approx(top - ctl, rel=1e-6, abs=1e-12) and s[key] == pytest.approx(g.gap_nll)
        assert s[key + "_lo"] == pytest.approx(g.gap_nll_lo) and s[key + "_hi"] == pytest.approx(g.gap_nll_hi)
        assert g.gap_nll_lo <= g.gap_nll_hi
    for metric in ("magnitude", "grad_x_weight"):
        top = [x for (v, p, m, mt, sel, k), x in means.items() if v == "delta_ppl" and mt == metric and sel == "top_k"]
        assert s[f"max_delta_ppl/{metric}"] == pytest.approx(max(top))
    assert s["headline/max_delta_ppl_random_k"] == pytest.approx(
        max(x for key, x in means.items() if key[0] == "delta_ppl" and key[4] == "random_k"))
    assert s["meta/config_hash"] == chash(tracked["cfg"])


def test_history_has_one_step_per_row(tracked):
    hist = [h for h in tracked["rec"]["history"] if "row" in h]
    n = len(pd.read_csv(tracked["out"] / "results.csv"))
    assert [h["row"] for h in hist] == list(range(1, n + 1))
    assert hist[-1]["progress"] == pytest.approx(1.0)
    assert {h["row/selection"] for h in hist} == {"top_k", "random_k", "bottom_k", "matched_k"}


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return (a is None or (isinstance(a, float) and math.isnan(a))) and (b is None or (isinstance(b, float) and math.isnan(b)))
        return a == pytest.approx(b, rel=1e-12, abs=1e-15)
    return a == b


def _table(path) -> pd.DataFrame:
    tab = json.loads(open(path).read())
    return pd.DataFrame(tab["data"], columns=tab["columns"])


def _artifacts(tracked) -> dict:
    return {a["type"]: a for a in tracked["rec"]["artifacts"] if a["type"] not in ("scores", "run_table")}


def test_results_table_equals_the_csv_plus_config_columns(tracked):
    out, cfg = tracked["out"], tracked["cfg"]
    files = _artifacts(tracked)["results"]["files"]
    table = next(local for name, local in files.items() if name.startswith("results_table"))
    tab, csv = _table(table), pd.read_csv(out / "results.csv")
    cols = run_identity.config_columns(cfg)
    assert "model.name" in cols and "perturb.scale" in cols and "out_dir" not in cols
    assert list(tab.columns) == list(csv.columns) + list(cols)
    assert len(tab) == len(csv) > 0
    for (_, a), (_, b) in zip(tab.iterrows(), csv.iterrows()):
        for c in csv.columns:
            bv = b[c].item() if hasattr(b[c], "item") else b[c]
            assert _same(a[c], bv), (c, a[c], bv)
        for c, v in cols.items():
            assert a[c] == v
    gtab = next(local for name, local in files.items() if name.startswith("gaps_table"))
    assert len(_table(gtab)) == len(pd.read_csv(out / "gaps.csv"))


def test_artifacts_hold_the_out_dir_files(tracked):
    out, cfg = tracked["out"], tracked["cfg"]
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    by_type = _artifacts(tracked)
    assert set(by_type) == {"results", "rankings", "manifest", "plots"}
    for kind, a in by_type.items():
        assert a["name"] == f"{kind}-{run_identity.model_slug(cfg.model.name)}"
        assert sorted(a["aliases"]) == ["latest", f"run-{run_id}"]  # one version per alias: labels are tags
        assert a["tags"] == [f"cfg-{chash(cfg)}", "seed-0", "seed-1"]
        assert a["metadata"]["config_hash"] == chash(cfg) and a["metadata"]["run"] == run_id
        assert a["metadata"]["seeds"] == [0, 1] and a["metadata"]["sweep_id"] is None
    files = {k: {n for n in a["files"] if not n.endswith(".table.json")} for k, a in by_type.items()}
    assert files["results"] == {"results.csv", "gaps.csv", "effects.csv", "metric_comparison.csv", "perturbation_results.json"}
    assert files["rankings"] == {"rankings.csv", "selections.safetensors", "stability.csv", "stability_summary.csv",
                                 "sensitivity_scores.safetensors"}
    for kind in ("results", "rankings", "manifest"):
        for name in files[kind]:
            assert open(by_type[kind]["files"][name], "rb").read() == (out / name).read_bytes(), name
    logged_manifest = json.loads(open(by_type["manifest"]["files"]["manifest.json"]).read())
    final = json.loads((out / "manifest.json").read_text())
    assert logged_manifest["wandb"]["id"] == run_id == final["wandb"]["id"]
    assert final == logged_manifest
    assert "plots/delta_ppl_vs_k.html" in by_type["plots"]["files"]
    if not chrome_available():
        pytest.skip("no Chrome/Chromium for PNG export (apt-get install chromium)")
    pngs = {n for n in by_type["plots"]["files"] if n.endswith(".png")}
    assert "plots/delta_ppl_vs_k.png" in pngs and "plots/stability_seeds.png" in pngs
    for n in pngs:
        assert open(by_type["plots"]["files"][n], "rb").read() == (out / n).read_bytes()


def test_score_sets_logged_as_inputs_named_by_cache_key(tracked):
    """One scores artifact per (metric, seed) score set, a reference to the cached file (no copy), aliased by
    its cache key and tagged with its seed."""
    rec, cfg, result = tracked["rec"], tracked["cfg"], tracked["result"]
    keys = result.extra["score_keys"]
    assert set(keys) == {f"{m}.seed{s}" for m in ("magnitude", "grad_x_weight") for s in (0, 1)}
    assert keys["magnitude.seed0"] == keys["magnitude.seed1"]  # no calibration data: one score set
    scores = [a for a in rec["artifacts"] if a["type"] == "scores"]
    assert len(scores) == 4
    model = run_identity.model_slug(cfg.model.name)
    for tag, key in keys.items():
        metric, seed = tag.split(".seed")
        a = next(x for x in scores if f"key-{key}" in x["aliases"] and f"seed-{seed}" in x["tags"])
        assert sorted(a["aliases"]) == [f"key-{key}", "latest"]
        assert a["name"] == f"scores-{model}-{metric}" and a["metadata"]["cache_key"] == key
        cached = cache_root(cfg.cache_dir) / "scores" / f"{key}.safetensors"
        assert a["files"]["scores.safetensors"] == cached.resolve().as_uri()  # a reference: nothing copied
        assert a["metadata"]["cache_path"] == str(cached.resolve())
        assert rec["summary"][f"inputs/{tag}"] == f"scores-{model}-{metric}:key-{key}"
    mag = [a for a in scores if a["name"].endswith("-magnitude")]
    assert mag[0]["digest"] == mag[1]["digest"]  # the same score set: one digest
    # no staging copy of any score set: no file in W&B's staging folder holds a score set's bytes
    sets = {(cache_root(cfg.cache_dir) / "scores" / f"{k}.safetensors").read_bytes() for k in keys.values()}
    staged = [p for p in (tracked["out"] / "wandb" / "staging").rglob("*") if p.is_file()]
    assert staged and not [p for p in staged if p.read_bytes() in sets]


def test_csv_tables_are_in_the_workspace_and_the_sweep_metric_is_finite(tracked):
    """Every out_dir CSV logged to the run as a table (the same rows); the sweep metric recomputed from the CSV."""
    out, rec = tracked["out"], tracked["rec"]
    s, files = rec["summary"], tracked["run_dir"] / "files"
    for name in ("results", "gaps"):
        csv = pd.read_csv(out / f"{name}.csv")
        assert s[f"tables/{name}._type"] == "table-file" and s[f"tables/{name}_rows"] == len(csv)
        tab = json.loads((files / s[f"tables/{name}.path"]).read_text())
        assert tab["columns"] == list(csv.columns) and len(tab["data"]) == len(csv)
    rows = pd.read_csv(out / "results.csv")
    top = rows[rows["selection"] == "top_k"]
    want = max(g["delta_nll"].mean() for _, g in top.groupby(["perturbation", "mode", "metric", "k"]))
    assert s["sweep/max_delta_nll_top_k"] == pytest.approx(min(want, 30.0))
    assert tracked["rec"]["run"]["run_group"] == "test-group"


def test_plots_logged_as_images_and_charts(tracked):
    s, run_dir = tracked["rec"]["summary"], tracked["run_dir"]
    assert s["charts/delta_ppl_vs_k._type"] == "plotly-file"
    assert s["charts/layer_sensitivity._type"] == "plotly-file"
    if not chrome_available():
        pytest.skip("no Chrome/Chromium for PNG export (apt-get install chromium)")
    assert s["plots/delta_ppl_vs_k._type"] == "image-file"
    img = run_dir / "files" / s["plots/delta_ppl_vs_k.path"]
    assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_secret_is_written(tracked):
    hits = []
    for p in tracked["out"].rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [(str(p), k) for k, v in SECRETS.items() if v.encode() in data]
    assert hits == []


def test_manifest_records_the_run_and_the_run_is_finished(tracked):
    from superweight.edge.sweep import is_finished

    out = tracked["out"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["wandb"]["mode"] == "offline" and m["wandb"]["dir"] == str(tracked["run_dir"].resolve())
    assert m["wandb"]["id"] == tracked["rec"]["run"]["run_id"]
    assert m["config_hash"] == chash(tracked["cfg"])
    assert is_finished(out, tracked["cfg"])  # the `finished` record comes after W&B has the final state


def test_rankings_jaccard_equals_stability_csv(tracked):
    out = tracked["out"]
    ranks, stab = pd.read_csv(out / "rankings.csv"), pd.read_csv(out / "stability.csv")
    for k in (1, 10, 100):
        ours = jaccard_from_rankings(ranks, k).set_index(["a", "b"])["jaccard"]
        ref = stab[(stab["k"] == k) & (stab["mode"] == "global")].set_index(["a", "b"])["jaccard"]
        assert len(ref) == 2 + 2  # 2 seed pairs (one per metric), 2 metric pairs (one per seed)
        for key, v in ref.items():
            assert ours[key] == pytest.approx(v)


def _copy(tracked, tmp_path, name, ignore=("wandb",)):
    out = tmp_path / name
    shutil.copytree(tracked["out"], out, ignore=shutil.ignore_patterns(*ignore))
    argv = [a for a in tracked["argv"] if not a.startswith("out_dir=")] + [f"out_dir={out}"]
    return out, argv


def test_rerun_resumes_the_same_wandb_run(tracked, tmp_path, capsys):
    """A rerun of the same config in the same out_dir (every row reused) publishes into the same W&B run;
    another config hash in wandb_run.json starts a new run."""
    out, argv = _copy(tracked, tmp_path, "copy")
    first = json.loads((out / "wandb_run.json").read_text())
    run(argv)
    assert "resuming" in capsys.readouterr().out
    info = json.loads((out / "wandb_run.json").read_text())
    assert info["id"] == first["id"] and info["mode"] == "offline"
    rec = offline_runs.read_offline_run(offline_runs.offline_run_dirs(out / "wandb")[-1])
    assert rec["run"]["run_id"] == first["id"] and rec["exit_code"] == 0
    # a different config hash: a new W&B run
    (out / "wandb_run.json").write_text(json.dumps({**first, "config_hash": "0" * 16}))
    run(argv)
    assert json.loads((out / "wandb_run.json").read_text())["id"] != first["id"]


def test_disabled_mode_logs_nothing(tracked, tmp_path):
    out, argv = _copy(tracked, tmp_path, "copy", ignore=("wandb", "wandb_run.json"))
    _, _, result = run([a for a in argv if not a.startswith("wandb.mode=")] + ["wandb.mode=disabled"])
    assert result.extra["wandb"] == {"mode": "disabled"}
    assert json.loads((out / "manifest.json").read_text())["wandb"] == {"mode": "disabled"}
    assert not (out / "wandb").exists() and not (out / "wandb_run.json").exists()


def test_summary_metrics_on_a_synthetic_table():
    rows = []
    for seed, (t1, t10, r1, r10) in enumerate([(1.0, 50.0, 0.1, 0.2), (3.0, 70.0, -0.1, 0.4)]):
        for sel, k, d in [("top_k", 1, t1), ("top_k", 10, t10), ("random_k", 1, r1), ("random_k", 10, r10)]:
            rows.append({"perturbation": "zero", "mode": "global", "metric": "m", "selection": sel, "k": k,
                         "seed": seed, "delta_ppl": d, "delta_nll": d / 10, "delta_acc": -d / 100,
                         "ppl_ratio": (40 + d) / 40})
    rows.append({**rows[0], "selection": "bottom_k", "delta_ppl": np.inf, "ppl_ratio": np.inf})
    base = {"ppl": 40.0, "nll": 3.7, "acc": 0.3, "tag": "not a number"}
    s = summary_metrics(pd.DataFrame(rows), base, gaps(rows, base))
    assert s["baseline/ppl"] == 40.0 and "baseline/tag" not in s
    assert s["delta_ppl/zero/global/m/top_k/k10"] == pytest.approx(60.0)
    assert s["delta_nll/zero/global/m/random_k/k10"] == pytest.approx(0.03)
    # Top-K minus control in ΔNLL, mean over seeds; no per-window data here: no interval
    assert s["gap_nll/zero/global/m/random_k/k10"] == pytest.approx(6.0 - 0.03)
    assert s["gap_nll/zero/global/m/random_k/k1"] == pytest.approx(0.2 - 0.0)
    assert s["gap_nll/zero/global/m/random_k/k10_lo"] is None and s["gap_nll/zero/global/m/random_k/k10_hi"] is None
    assert "headline/max_gap_nll_random_k" not in s  # no interval excludes 0
    assert s["max_delta_ppl/m"] == pytest.approx(60.0)
    assert s["headline/max_delta_ppl_random_k"] == pytest.approx(0.3)
    assert s["headline/k_to_double_ppl/m"] == 10  # mean ratio at K=10 is 100/40 >= 2, at K=1 it is 42/40
    assert s["delta_ppl/zero/global/m/bottom_k/k1"] is None  # non-finite -> None


def test_figures_read_an_offline_wandb_run_back(tracked, tmp_path):
    from superweight.edge.figures import resolve_sources

    dirs = resolve_sources([str(tracked["run_dir"])], tmp_path)
    assert len(dirs) == 1
    for name in ("results.csv", "rankings.csv", "gaps.csv", "manifest.json"):
        assert (dirs[0] / name).read_bytes() == (tracked["out"] / name).read_bytes(), name
    assert json.loads((dirs[0] / "manifest.json").read_text())["config"] == json.loads(json.dumps(tracked["cfg"].to_dict()))


def test_table_equals_the_dataframe_construction():
    """lineage.table builds from row lists: the column types of wandb.Table(dataframe=...), Python scalars, and
    None for every non-finite float (the dataframe construction of the mapped frame kept NaN: pandas turns a
    None back into NaN in a float-derived column)."""
    import wandb

    from superweight.edge.lineage import table

    df = pd.DataFrame({"metric": ["a", "b", None, "d"], "k": [1, 10, 100, 1000], "flag": [True, False, True, True],
                       "score": [0.5, np.nan, np.inf, -np.inf], "value": [1.0, 2.0, 3.0, 4.5]})
    got = table(df, 3)
    assert got.columns == list(df.columns)
    assert got.data[0] == ["a", 1, True, 0.5, 1.0] and got.data[1] == ["b", 10, False, None, 2.0]
    assert np.isnan(got.data[2][0]) and got.data[2][1:] == [100, True, None, 3.0] and len(got.data) == 3
    assert repr(got._column_types) == repr(wandb.Table(dataframe=df.head(3))._column_types)
