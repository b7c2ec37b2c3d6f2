"""The experiment, top to bottom: load -> baseline -> for metric, seed: score -> rank -> for K, mode,
selection, perturbation: perturb + evaluate + restore -> stability -> files in out_dir -> W&B + plots.

Research question: do a few weights control the model, and which metric finds them? The answer is the
gap between Top-K and the controls (Random-K, Bottom-K) at equal K, under the same perturbation.

Reliability: everything is validated before anything is written; each finished result row is appended
to `out_dir/.progress.jsonl`, so a killed run resumes where it stopped (rows are reused only if the
config that produced them is identical); final files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .cache import ScoreCache, score_key
from .config import ConfigError, RunConfig, validate
from .data import Windows, build_windows
from .evaluate import TASKS, evaluate_lm
from .io import append_jsonl, atomic_write, atomic_write_json, atomic_write_text, kill_point, read_jsonl, remove_stale_temps
from .metrics import METRICS, ScoreContext, compute_scores
from .models import cache_root, check_quantized, eligible_parameters, layer_of, load_model, model_context, model_info, module_type
from .perturb import PERTURBATIONS, check_storage, parse_bits, perturbed
from .rank import Ranking, jaccard, rank, ranking_rows

RESULT_COLUMNS = [
    "metric", "seed", "mode", "selection", "k", "n_selected", "perturbation", "ppl", "nll", "acc",
    "delta_ppl", "delta_nll", "delta_acc", "ppl_ratio", "changed", "nonfinite_weights", "nonfinite",
]
TOP_SAVED = 10_000  # top entries per (metric, seed) kept in sensitivity_scores.safetensors


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_hash(cfg: RunConfig) -> str:
    """Hash of what determines the results (not out_dir, tracking or resume flags)."""
    d = cfg.to_dict()
    for k in ("out_dir", "wandb", "resume", "cache_dir", "plots"):
        d.pop(k, None)
    d["score"].pop("cache", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Experiment:
    cfg: RunConfig
    progress: bool = True
    # filled by run()
    rows: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    top_rankings: dict = field(default_factory=dict)  # (metric, seed, mode) -> top_k Ranking
    stability_rows: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        from .sweep import apply_sweep_env

        apply_sweep_env(self.cfg)  # inside a sweep: per-run out_dir and W&B group (no-op otherwise)
        validate(self.cfg)

    # ---- setup: everything that can fail on bad input happens before out_dir is touched ----------
    def setup(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        self.model, self.tok, self.device = load_model(cfg.model, cfg.cache_dir)
        self.timings["load_s"] = time.perf_counter() - t
        self.params = eligible_parameters(self.model, cfg.score.include, cfg.score.exclude)
        n_eligible = sum(p.numel() for p in self.params.values())
        kmax = max(cfg.select.topk)
        if "global" in cfg.select.modes and kmax > n_eligible:
            raise ConfigError(f"topk={kmax} is larger than the {n_eligible} eligible weights; valid: 1..{n_eligible}")
        if "per_layer" in cfg.select.modes:  # same bounds rank_per_layer / rank_per_row enforce, checked early
            name, n = min(((nm, p.numel()) for nm, p in self.params.items()), key=lambda x: x[1])
            if kmax > n:
                raise ConfigError(f"topk={kmax} with mode=per_layer is larger than the smallest eligible tensor "
                                  f"{name} ({n} weights); valid: 1..{n}")
        if "per_row" in cfg.select.modes:
            name, n = min(((nm, p[0].numel() if p.ndim >= 2 else p.numel()) for nm, p in self.params.items()),
                          key=lambda x: x[1])
            if kmax > n:
                raise ConfigError(f"topk={kmax} with mode=per_row is larger than the row length {n} of {name}; "
                                  f"valid: 1..{n}")
        check_storage(cfg.perturb.names, {p.dtype for p in self.params.values()})
        check_quantized(self.params, cfg.score.metrics, cfg.perturb.names)  # 8/4-bit: what is meaningful
        if "bit_flip" in cfg.perturb.names:
            for dt in {p.dtype for p in self.params.values()}:
                parse_bits(cfg.perturb.bits, dt)
        self.windows: Windows = build_windows(cfg.data, self.tok, cfg.cache_dir, context=model_context(self.model))
        self.info = model_info(self.model, cfg.model, self.params)
        self.cache = ScoreCache(cache_root(cfg.cache_dir), enabled=cfg.score.cache)
        self.out = Path(cfg.out_dir)
        self.chash = config_hash(cfg)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> pd.DataFrame:
        cfg = self.cfg
        started = _now()
        t0 = time.perf_counter()
        self.setup()
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out)  # temp files of a run killed mid-write (never reported as outputs)
        done = self._load_progress()

        self.baseline = done.get(("baseline",)) or self._record(("baseline",), self._evaluate())
        print(f"baseline: ppl={self.baseline['ppl']:.3f} nll={self.baseline['nll']:.4f} acc={self.baseline['acc']:.4f}")

        memo: dict[tuple, dict] = {}  # identical selections (e.g. random_k across metrics) evaluate once
        kmax = max(cfg.select.topk)
        self.score_summaries: dict[str, dict[str, torch.Tensor]] = {}
        n_rows = (len(cfg.score.metrics) * len(cfg.seeds) * len(cfg.select.modes) * (1 + len(cfg.select.controls))
                  * len(cfg.select.topk) * len(cfg.perturb.names))
        bar = tqdm(total=n_rows, desc="perturb+evaluate", unit="row", disable=not self.progress)
        for metric in cfg.score.metrics:
            for seed in cfg.seeds:
                scores = self.scores(metric, seed)
                self._summarize_scores(metric, seed, scores)
                for mode in cfg.select.modes:
                    for selection in ["top_k", *cfg.select.controls]:
                        r = rank(scores, kmax, mode, selection, seed)
                        if selection == "top_k":
                            self.top_rankings[(metric, seed, mode)] = r
                        for k in sorted(cfg.select.topk):
                            sel = r.take(k)
                            for pert in cfg.perturb.names:
                                key = ("row", metric, seed, mode, selection, k, pert)
                                bar.update()
                                if key in done:
                                    self.rows.append(done[key])
                                    continue
                                row = self._perturb_eval(sel, pert, seed, memo)
                                row = {"metric": metric, "seed": seed, "mode": mode, "selection": selection, "k": k,
                                       "n_selected": len(sel), "perturbation": pert, **row}
                                self.rows.append(self._record(key, row))
                del scores
        bar.close()
        self.stability_rows = self.stability()
        self.timings["total_s"] = time.perf_counter() - t0
        df = self.write_outputs(started)
        kill_point("publish")
        self.publish()
        return df

    def publish(self) -> dict:
        """Plots (out_dir/plots) and the W&B run, after the result files exist; then mark the run finished
        (`published` in manifest.json, what `superweight sweep` checks). A failing plot export or W&B
        upload only warns: the results are on disk and a rerun of the same command publishes again."""
        import sys

        from .plots import run_figures, save_figures
        from .tracking import log_run

        info: dict = {"plots": [], "wandb": {"mode": "disabled"}}
        formats = [f for f in self.cfg.plots if f != "none"]
        if formats:
            try:
                written = save_figures(run_figures(self.out), self.out / "plots", ["json", *formats])
                info["plots"] = sorted(str(p.relative_to(self.out)) for p in written)
            except Exception as e:  # noqa: BLE001 - plots must never lose a finished run
                print(f"superweight: warning: plots failed: {type(e).__name__}: {e}", file=sys.stderr)
        try:
            info["wandb"] = log_run(self.cfg, self.out, self.chash)
        except Exception as e:  # noqa: BLE001
            print(f"superweight: warning: W&B logging failed ({type(e).__name__}: {e}); results are in "
                  f"{self.out}; rerun the same command to retry", file=sys.stderr)
            info["wandb"] = {"mode": "failed", "error": f"{type(e).__name__}: {e}"}
        path = self.out / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["published"] = {"at": _now(), "plots": len(info["plots"]), "wandb": info["wandb"].get("mode")}
        atomic_write_json(path, manifest)
        self.manifest = manifest
        return info

    # ---- pieces --------------------------------------------------------------------------------------
    def scores(self, metric: str, seed: int) -> dict[str, torch.Tensor]:
        """Score set for (metric, seed), from the content-addressed cache when possible."""
        spec = METRICS[metric]
        calib = self.windows.calib_idx(seed).tolist() if spec.needs_calibration else None
        key = score_key({
            "model": self.info.fingerprint, "data": self.windows.fingerprint if calib is not None else None,
            "calib": calib, "metric": metric, "params": {p: getattr(self.cfg.score, p) for p in spec.params},
            "names": list(self.params), "dtype": self.cfg.score.dtype,
            # CUDA scores run under bf16 autocast, CPU scores in fp32: never reuse one for the other
            "device": self.device.type,
        })
        dev = torch.device("cpu") if self.cfg.score.offload else self.device
        cached = self.cache.get(key, dev)
        if cached is not None and set(cached) == set(self.params):
            # safetensors returns keys sorted by name; rankings (random_k draws, tie-breaks) depend on the
            # parameter order, so restore the model's order: a cache hit gives the same rows as a miss.
            return {n: cached[n] for n in self.params}
        t = time.perf_counter()
        ids = self.windows.calib(seed)
        bs = self.cfg.score.batch_size
        ctx = ScoreContext(self.model, self.params, [ids[i : i + bs] for i in range(0, ids.size(0), bs)],
                           self.cfg.score, self.device, seed, self.progress)
        scores = compute_scores(metric, ctx)
        kill_point("score", f"{metric}.seed{seed}")
        self.timings[f"score_{metric}_seed{seed}_s"] = time.perf_counter() - t
        self.cache.put(key, scores, {"metric": metric, "seed": seed, "model": self.info.name})
        return scores

    def _evaluate(self) -> dict:
        ids, labels = self.windows.eval_inputs()
        res = evaluate_lm(self.model, ids, labels, self.cfg.eval.batch_size, progress=False).as_dict()
        for task in self.cfg.eval.tasks:
            for k, v in TASKS[task](self.model, self.tok, self.cfg.eval.task_limit, self.cfg.eval.batch_size).items():
                res[f"{task}/{k}"] = v
        return res

    def _perturb_eval(self, sel: Ranking, pert: str, seed: int, memo: dict) -> dict:
        by_param = sel.by_param()
        h = hashlib.sha256()
        for n in sorted(by_param):
            h.update(n.encode())
            h.update(by_param[n].numpy().tobytes())
        mkey = (h.hexdigest(), pert, seed if PERTURBATIONS[pert].stochastic else None)
        if mkey not in memo:
            with perturbed(self.params, by_param, pert, self.cfg.perturb, seed) as pinfo:
                # No bit changed (e.g. Bottom-K zeroing weights that are already 0): the model is the
                # baseline model, so its results are the baseline's; skip the forward passes.
                res = dict(self.baseline) if pinfo["changed"] == 0 else self._evaluate()
            b = self.baseline
            res.update({
                "delta_ppl": res["ppl"] - b["ppl"], "delta_nll": res["nll"] - b["nll"], "delta_acc": res["acc"] - b["acc"],
                "ppl_ratio": res["ppl"] / b["ppl"], "changed": pinfo["changed"], "nonfinite_weights": pinfo["nonfinite"],
            })
            for k in list(res):
                if "/" in k and k in b:
                    res[f"delta_{k}"] = res[k] - b[k]
            memo[mkey] = res
        return dict(memo[mkey])

    def stability(self) -> list[dict]:
        """Jaccard overlap of Top-K sets: across seeds (same metric) and across metrics (same seed)."""
        rows = []
        metrics, seeds = self.cfg.score.metrics, self.cfg.seeds
        for mode in self.cfg.select.modes:
            for k in sorted(self.cfg.select.topk):
                for m in metrics:
                    for i, a in enumerate(seeds):
                        for b in seeds[i + 1 :]:
                            j = jaccard(self.top_rankings[(m, a, mode)].take(k), self.top_rankings[(m, b, mode)].take(k))
                            rows.append({"kind": "seed", "mode": mode, "k": k, "a": f"{m}/seed{a}", "b": f"{m}/seed{b}",
                                         "metric_a": m, "metric_b": m, "seed_a": a, "seed_b": b, "jaccard": j})
                for s in seeds:
                    for i, ma in enumerate(metrics):
                        for mb in metrics[i + 1 :]:
                            j = jaccard(self.top_rankings[(ma, s, mode)].take(k), self.top_rankings[(mb, s, mode)].take(k))
                            rows.append({"kind": "metric", "mode": mode, "k": k, "a": f"{ma}/seed{s}", "b": f"{mb}/seed{s}",
                                         "metric_a": ma, "metric_b": mb, "seed_a": s, "seed_b": s, "jaccard": j})
        return rows

    def _summarize_scores(self, metric: str, seed: int, scores: dict[str, torch.Tensor]) -> None:
        """What goes to sensitivity_scores.safetensors: global top entries and per-tensor score mass."""
        top = rank(scores, min(TOP_SAVED, sum(s.numel() for s in scores.values())), "global", "top_k")
        names = list(scores)
        self.score_summaries[f"{metric}.seed{seed}"] = {
            "top_pid": top.pid, "top_flat": top.flat, "top_score": top.score.float(),
            "param_sum": torch.tensor([float(scores[n].double().sum()) for n in names], dtype=torch.float64),
            "param_max": torch.tensor([float(scores[n].float().max()) for n in names], dtype=torch.float64),
        }

    # ---- resume ----------------------------------------------------------------------------------------
    def _load_progress(self) -> dict:
        path = self.out / ".progress.jsonl"
        entries = read_jsonl(path, repair=True) if self.cfg.resume else []
        if not entries or entries[0].get("config_hash") != self.chash:
            if path.exists():
                path.unlink()
            append_jsonl(path, {"config_hash": self.chash, "created": _now()})
            return {}
        done = {tuple(e["key"]): e["value"] for e in entries[1:] if "key" in e}
        if done:
            print(f"resuming: {len(done)} finished rows reused from {path}")
        return done

    def _record(self, key: tuple, value: dict) -> dict:
        append_jsonl(self.out / ".progress.jsonl", {"key": list(key), "value": value})
        kill_point("row")
        return value

    # ---- outputs ---------------------------------------------------------------------------------------
    def write_outputs(self, started: str) -> pd.DataFrame:
        out, cfg = self.out, self.cfg
        df = pd.DataFrame(self.rows)
        cols = [c for c in RESULT_COLUMNS if c in df.columns] + [c for c in df.columns if c not in RESULT_COLUMNS]
        df = df[cols]
        atomic_write(out / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
        atomic_write_json(out / "perturbation_results.json", {
            "baseline": self.baseline, "rows": self.rows, "model": self.info.__dict__,
            "config_hash": self.chash,
        })
        rank_rows = []
        for (metric, seed, mode), r in self.top_rankings.items():
            for row in ranking_rows(r, None, self.params, cfg.select.save_top):
                rank_rows.append({"metric": metric, "seed": seed, "mode": mode, **row,
                                  "module": module_type(row["param"])})
        rdf = pd.DataFrame(rank_rows)
        atomic_write(out / "rankings.csv", lambda tmp: rdf.to_csv(tmp, index=False))
        sdf = pd.DataFrame(self.stability_rows, columns=["kind", "mode", "k", "a", "b", "metric_a", "metric_b",
                                                         "seed_a", "seed_b", "jaccard"])
        atomic_write(out / "stability.csv", lambda tmp: sdf.to_csv(tmp, index=False))
        ssum = stability_summary(sdf)
        atomic_write(out / "stability_summary.csv", lambda tmp: ssum.to_csv(tmp, index=False))
        tensors = {f"{key}.{n}": t.contiguous() for key, d in self.score_summaries.items() for n, t in d.items()}
        meta = {"param_names": json.dumps(list(self.params)),
                "param_shapes": json.dumps([list(p.shape) for p in self.params.values()]),
                "layers": json.dumps([layer_of(n) for n in self.params]),
                "modules": json.dumps([module_type(n) for n in self.params])}
        atomic_write(out / "sensitivity_scores.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
        from .manifest import build_manifest

        manifest = build_manifest(
            cfg.to_dict(), self.info.__dict__,
            {"corpus": cfg.data.corpus, "fingerprint": self.windows.fingerprint, "tokens": self.windows.n_tokens,
             "eval_windows": len(self.windows.eval_idx), "calib_pool": len(self.windows.pool_idx),
             "calib_windows": {s: self.windows.calib_idx(s).tolist() for s in cfg.seeds}},
            {"start": started, "end": _now(), **{k: round(v, 3) for k, v in self.timings.items()}},
            {"config_hash": self.chash, "device": str(self.device), "baseline": self.baseline,
             "score_cache": {"hits": self.cache.hits, "misses": self.cache.misses}},
        )
        atomic_write_json(out / "manifest.json", manifest)
        self.manifest = manifest
        return df


STABILITY_SUMMARY_COLUMNS = ["kind", "mode", "k", "metric", "metric_a", "metric_b", "n_pairs",
                             "mean_jaccard", "min_jaccard", "max_jaccard"]


def stability_summary(sdf: pd.DataFrame) -> pd.DataFrame:
    """stability.csv summarized: for every (kind, mode, K, metric pair) the mean, min and max Jaccard over
    its pairs. kind=seed: one metric (metric_a = metric_b), over all seed pairs (a, b), a < b: how
    reproducible that metric's Top-K is across calibration data. kind=metric: two metrics, over seeds."""
    if sdf.empty:
        return pd.DataFrame(columns=STABILITY_SUMMARY_COLUMNS)
    g = sdf.groupby(["kind", "mode", "k", "metric_a", "metric_b"], sort=False)["jaccard"]
    out = g.agg(n_pairs="size", mean_jaccard="mean", min_jaccard="min", max_jaccard="max").reset_index()
    out["metric"] = [a if kind == "seed" else f"{a} vs {b}"
                     for kind, a, b in zip(out["kind"], out["metric_a"], out["metric_b"])]
    return out[STABILITY_SUMMARY_COLUMNS].sort_values(["kind", "mode", "metric", "k"], kind="stable").reset_index(drop=True)


def summary_table(df: pd.DataFrame) -> str:
    """ΔPPL per metric and K, Top-K next to the controls (first mode and perturbation)."""
    if df.empty:
        return ""
    d = df[(df["mode"] == df["mode"].iloc[0]) & (df["perturbation"] == df["perturbation"].iloc[0])]
    piv = d.groupby(["metric", "k", "selection"])["ppl"].mean().unstack("selection")
    return f"mean PPL over seeds ({d['mode'].iloc[0]}, {d['perturbation'].iloc[0]}):\n" + piv.to_string(float_format=lambda x: f"{x:.3f}")
