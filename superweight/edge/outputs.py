"""The files of a finished run in out_dir, each written once, atomically (temp file + rename):

results.csv, perturbation_results.json (rows with per-window NLL), gaps.csv (Top-K minus control, CIs),
effects.csv (ΔNLL / PPL ratio per selection with CIs: the error bars of the plots), metric_comparison.csv
(per metric: the K that doubles PPL and the gap to each control at each K, ranked), rankings.csv (Top-K and every
control selection, `select.save_top` rows each), selections.safetensors (the exact weights of every
selection: parameter id and flat index, K_max of each, so any K is a prefix), stability.csv,
stability_summary.csv, sensitivity_scores.safetensors, plots/, and manifest.json last (its presence means
the result files are complete).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from safetensors.torch import save_file

from ..files import atomic_write, atomic_write_json
from .manifest import build_manifest
from ..core.comparison import metric_comparison
from ..core.params import layer_of, module_type
from .export import STATIC, Browser, chrome_available
from .plots import run_figures, save_figures
from ..core.gaps import effects
from ..core.results import results_frame
from ..core.stability import STABILITY_COLUMNS, stability_summary
from .ranking_rows import ranking_rows

MANIFEST = "manifest.json"


class RunOutputs:
    """The experiment's sink: writes every file of a Result into out_dir (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.manifest: dict | None = None
        self.plots: list[str] = []
        self.comparison: pd.DataFrame | None = None  # metric_comparison.csv, printed at the end of a run

    def write(self, result) -> dict[str, list[str]]:
        """Write every file; return their paths relative to out_dir by kind (results, rankings, plots,
        manifest): the tracker publishes exactly these."""
        browser = self.start_browser(result.cfg)  # Chrome starts (about 2 s) while the result files are written
        try:
            return self._write(result, browser)
        finally:
            if browser is not None:
                browser.close()

    def _write(self, result, browser) -> dict[str, list[str]]:
        out, cfg = self.out, result.cfg
        df = results_frame(result.rows)
        atomic_write(out / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
        atomic_write_json(out / "perturbation_results.json", {
            "baseline": result.baseline, "rows": result.rows, "model": result.model, "config_hash": result.config_hash})
        atomic_write(out / "gaps.csv", lambda tmp: result.gaps.to_csv(tmp, index=False))
        eff = effects(result.rows, result.baseline)
        atomic_write(out / "effects.csv", lambda tmp: eff.to_csv(tmp, index=False))
        self.comparison = metric_comparison(result.gaps, eff)
        atomic_write(out / "metric_comparison.csv", lambda tmp: self.comparison.to_csv(tmp, index=False))
        rank_rows, sel = [], {}
        main = result.candidate_sets[0]  # the run's main candidate set: its tags carry no suffix
        for (metric, seed, mode, selection, draw, candidates), r in result.rankings.items():
            # k: empty = one nested ranking (the K-selection is `rank < K`); K = drawn for this K only (matched_k)
            for k, rk in ([*sorted(r.per_k.items()), (r.k_max, r)] if r.per_k else [(None, r)]):
                for row in ranking_rows(rk, result.weight_values, cfg.select.save_top):
                    rank_rows.append({"metric": metric, "seed": seed, "mode": mode, "selection": selection,
                                      "draw": draw, "k": k, "candidates": candidates, **row})
                tag = (f"{metric}.seed{seed}.{mode}.{selection}.draw{draw}" + (f".{candidates}" if candidates != main else "")
                       + (f".k{k}" if k is not None else ""))
                # own copies: equal selections (matched_k at Ks past a support) share their tensors
                sel[f"{tag}.pid"], sel[f"{tag}.flat"] = rk.pid.clone(), rk.flat.clone()
        rdf = pd.DataFrame(rank_rows)
        if "k" in rdf:
            rdf["k"] = rdf["k"].astype("Int64")  # empty for nested rankings, an integer K otherwise
        atomic_write(out / "rankings.csv", lambda tmp: rdf.to_csv(tmp, index=False))
        names = list(result.param_shapes)
        meta = {"param_names": json.dumps(names),
                "param_shapes": json.dumps([list(s) for s in result.param_shapes.values()]),
                "layers": json.dumps([layer_of(n) for n in names]),
                "modules": json.dumps([module_type(n) for n in names])}
        atomic_write(out / "selections.safetensors", lambda tmp: save_file(sel, tmp, metadata=meta))
        sdf = pd.DataFrame(result.stability, columns=STABILITY_COLUMNS)
        atomic_write(out / "stability.csv", lambda tmp: sdf.to_csv(tmp, index=False))
        ssum = stability_summary(sdf)
        atomic_write(out / "stability_summary.csv", lambda tmp: ssum.to_csv(tmp, index=False))
        # copies: the seeds of a set that reads no calibration data (magnitude) share one summary
        tensors = {f"{key}.{n}": t.clone() for key, d in result.score_summaries.items() for n, t in d.items()}
        atomic_write(out / "sensitivity_scores.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
        self.plots = self.write_plots(cfg, browser)
        self.manifest = build_manifest(
            cfg.to_dict(), result.model, result.data, result.timings,
            {"config_hash": result.config_hash, "baseline": {k: v for k, v in result.baseline.items()
                                                              if not isinstance(v, list)},
             "plots": self.plots, **result.extra})
        atomic_write_json(out / MANIFEST, self.manifest)
        return {"results": ["results.csv", "perturbation_results.json", "gaps.csv", "effects.csv", "metric_comparison.csv"],
                "rankings": ["rankings.csv", "selections.safetensors", "stability.csv", "stability_summary.csv",
                             "sensitivity_scores.safetensors"],
                "plots": self.plots, "manifest": [MANIFEST]}

    @staticmethod
    def start_browser(cfg) -> Browser | None:
        """A kaleido browser for the static plot formats, started now (None: none asked for, or no Chrome:
        save_figures then warns how to get one)."""
        if not any(f in STATIC for f in cfg.plots) or not chrome_available():
            return None
        try:
            return Browser()
        except Exception:  # noqa: BLE001 - save_figures starts its own
            return None

    def write_plots(self, cfg, browser: Browser | None = None) -> list[str]:
        """Plots (out_dir/plots); a failing export only warns: the results are on disk."""
        formats = [f for f in cfg.plots if f != "none"]
        if not formats:
            return []
        try:
            written = save_figures(run_figures(self.out), self.out / "plots", ["json", *formats], browser)
            return sorted(str(p.relative_to(self.out)) for p in written)
        except Exception as e:  # noqa: BLE001 - plots must never lose a finished run
            print(f"superweight: warning: plots failed: {type(e).__name__}: {e}", file=sys.stderr)
            return []


__all__ = ["RunOutputs", "MANIFEST"]
