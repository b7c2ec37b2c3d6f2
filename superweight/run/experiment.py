"""The experiment as a recipe (`Experiment.run`, one screen):

    setup    validate the config and every capability against a model built from its config alone, and
             the data with the tokenizer; create out_dir     (bad input: one line, nothing written)
    track    tracker.start()                                 (the W&B run is live from here)
    load     weights; capabilities again on the real parameters
    baseline evaluate the unperturbed model once
    loop     for metric, seed: scores (cached)
               for mode, candidate set: Top-K, then the controls (random_k / matched_k: several draws)
                 for K, perturbation: perturb -> evaluate -> restore (bit-exact), one row, logged as it ends
    collect  stability, gaps with confidence intervals        (core/gaps.py, stability.py: pure tables)
    write    sink.write(result): result files, plots, manifest (edge: outputs.py)
    publish  tracker.finish(result): tables and artifacts    (edge: tracking.py)

Research question: do a few weights control the model, and which metric finds them? The answer is the gap
between Top-K and the controls at equal K under the same perturbation, with its confidence interval.

The loop never imports the edge: the command (commands/run.py) hands it a tracker and a sink. Each finished
row is appended to `out_dir/.progress.jsonl` (progress.ResumeLog), so a killed run resumes where it stopped
(rows are reused only if the config hash, code version included, is identical).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .cache import CompactScores, ScoreCache, compact_key, score_key
from ..config import RunConfig, config_hash
from ..inputs.data import Windows, build_windows
from ..core.evaluation import TASKS, evaluate_lm
from ..files import kill_point, remove_stale_temps
from ..core.metrics import METRICS, ScoreContext, compute_scores
from ..inputs.models import (bos_every_window, build_fake_model, load_model, load_model_config, load_tokenizer, model_context,
                     model_info, pick_dtype)
from ..core.experts import input_axis
from ..core.params import eligible_parameters, owner, weight_values
from ..core.perturbation import PERTURBATIONS, changeable, perturbed
from .resume import ResumeLog, now
from ..resources import cache_root, code_version
from ..core.gaps import gaps
from ..core.results import make_row, results_frame
from ..core.stability import stability_pairs
from ..core.score_summary import score_summary
from ..core.matching import match_quality
from ..core.overlap import jaccard, tied_counts
from ..core.ranking import Ranking
from ..core.selections import SELECTIONS, rank, rank_grid
from .validation import check_capabilities, prepare_out_dir, validate

TOP_SAVED = 10_000  # top entries per (metric, seed) kept in sensitivity_scores.safetensors


class Tracker:
    """What the loop tells the outside world as it runs (the W&B tracker implements it; this one is silent)."""

    def start(self, exp: "Experiment") -> None: ...
    def log_row(self, row: dict, done: int, total: int) -> None: ...
    def log_stage(self, name: str, seconds: float) -> None: ...
    def finish(self, result: "Result") -> None: ...
    def fail(self, exc: BaseException) -> None: ...
    def info(self) -> dict:
        return {"mode": "disabled"}


class Sink:
    """Where a finished result goes (outputs.RunOutputs writes the out_dir files; this one keeps nothing)."""

    def write(self, result: "Result") -> None: ...


@dataclass
class Result:
    cfg: RunConfig
    config_hash: str
    baseline: dict
    rows: list[dict]
    rankings: dict[tuple, Ranking]  # (metric, seed, mode, selection, draw[, other candidate set]) -> K_max ranking
    stability: list[dict]
    gaps: pd.DataFrame
    score_summaries: dict[str, dict[str, torch.Tensor]]
    params: dict[str, torch.Tensor]
    values: object  # name -> real-valued weights (for rankings.csv)
    model: dict
    data: dict
    timings: dict
    extra: dict = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        return results_frame(self.rows)


def mask_groups(names: list[str], cfg) -> dict[tuple, list[str]]:
    """Perturbations grouped by the weights they can change (one candidate set, one ranking per group):
    the group key is the perturbation's `changeable` rule applied to the probe values (0, 1, -1)."""
    probe = torch.tensor([0.0, 1.0, -1.0])
    out: dict[tuple, list[str]] = {}
    for p in names:
        key = tuple(changeable(p, probe, cfg).tolist())
        out.setdefault(key, []).append(p)
    return out


@dataclass
class Experiment:
    cfg: RunConfig
    progress: bool = True
    tracker: Tracker = field(default_factory=Tracker)
    sink: Sink = field(default_factory=Sink)
    timings: dict = field(default_factory=dict)

    # ---- the recipe -------------------------------------------------------------------------------------
    def run(self) -> Result:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.started = now()
        self.setup()
        self.tracker.start(self)
        try:
            self.load()
            self.baseline = self.log.get(("baseline",)) or self.log.record(("baseline",), self.evaluate())
            print(f"baseline: ppl={self.baseline['ppl']:.3f} nll={self.baseline['nll']:.4f} acc={self.baseline['acc']:.4f}")
            self.rows, self.rankings, self.summaries = [], {}, {}
            bar = tqdm(total=self.n_rows(), desc="perturb+evaluate", unit="row", disable=not self.progress)
            try:
                self.loop(bar)
            finally:
                bar.close()  # a stop message never lands on the bar's line
            self.timings["total_s"] = time.perf_counter() - t0
            result = self.collect()
            self.sink.write(result)
            kill_point("publish")
            self.tracker.finish(result)
            return result
        except BaseException as e:
            self.tracker.fail(e)
            raise

    def loop(self, bar) -> None:
        """for metric, seed: scores -> for mode, candidate set, selection (and draw), K, perturbation: one row."""
        cfg, memo = self.cfg, {}
        done, total = 0, self.n_rows()  # counted here: a disabled progress bar counts nothing
        for metric in cfg.score.metrics:
            for seed in cfg.seeds:
                scores = self.scores(metric, seed)
                for mode in cfg.select.modes:
                    for g, perts in enumerate(mask_groups(cfg.perturb.names, cfg.perturb).values()):
                        mask = self.mask_fn(perts[0])
                        group = () if g == 0 else ("+".join(perts),)  # rankings of a 2nd candidate set: own key
                        for selection, draw, r in self.selections(metric, seed, mode, scores, mask, group):
                            for k in sorted(cfg.select.topk):
                                sel = r.take(k)
                                for pert in perts:
                                    key = ("row", metric, seed, mode, selection, draw, k, pert)
                                    row = self.log.get(key)
                                    if row is None:
                                        row = self.log.record(key, self.perturb_evaluate(
                                            sel, scores, mask, pert, seed, memo,
                                            dict(metric=metric, seed=seed, mode=mode, selection=selection,
                                                 draw=draw, k=k, perturbation=pert)))
                                    self.rows.append(row)
                                    done += 1
                                    bar.update()
                                    self.tracker.log_row(row, done, total)
                self.summarize_scores(metric, seed, scores)
                if not isinstance(scores, CompactScores):
                    self.cache.put_compact(self.compact_keys[(metric, seed)], CompactScores(
                        list(self.params), {k[2:]: r for k, r in self.rankings.items() if k[:2] == (metric, seed)},
                        self.summaries[f"{metric}.seed{seed}"]), {"metric": metric, "seed": seed, "model": self.info.name})
                del scores

    # ---- setup: everything that can fail on bad input happens before the weights load -----------------
    def setup(self) -> None:
        cfg = validate(self.cfg)
        t = time.perf_counter()
        device = torch.device("cpu") if cfg.model.device == "cpu" else torch.device(
            "cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu")
        fake_mode, fake = build_fake_model(load_model_config(cfg.model, cfg.cache_dir),
                                           pick_dtype(cfg.model.dtype, device), cfg.model.attn_implementation,
                                           cfg.model.trust_remote_code)
        check_capabilities(cfg, fake, eligible_parameters(fake, cfg.score.include, cfg.score.exclude))
        # the data too (context, corpus size, encoding): only the tokenizer is needed, no weights
        self.tok = load_tokenizer(cfg.model, cfg.cache_dir)
        self.windows: Windows = build_windows(cfg.data, self.tok, cfg.cache_dir, context=model_context(fake),
                                              bos_every_window=bos_every_window(fake))
        del fake, fake_mode
        self.timings["validate_s"] = time.perf_counter() - t
        self.out = prepare_out_dir(cfg.out_dir)
        remove_stale_temps(self.out)  # temp files of a run killed mid-write (never reported as outputs)
        self.chash = config_hash(cfg, code_version())
        self.log = ResumeLog(self.out, self.chash, cfg.resume)
        if len(self.log):
            print(f"resuming: {len(self.log)} finished rows reused from {self.log.path}")

    def load(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        self.model, _, self.device = load_model(cfg.model, cfg.cache_dir)
        self.params = eligible_parameters(self.model, cfg.score.include, cfg.score.exclude)
        check_capabilities(cfg, self.model, self.params, quantize="none")  # the real storage now
        self.modules = {n: owner(self.model, n)[1] for n in self.params}
        self.timings["load_s"] = time.perf_counter() - t
        self.tracker.log_stage("load", self.timings["load_s"])
        t = time.perf_counter()
        self.info = model_info(self.model, cfg.model, self.params)
        self.cache = ScoreCache(cache_root(cfg.cache_dir), cfg.score.cache)
        self.timings["data_s"] = time.perf_counter() - t
        self.tracker.log_stage("data", self.timings["data_s"])

    def n_rows(self) -> int:
        cfg = self.cfg
        per_sel = sum(SELECTIONS.get(s).random and cfg.select.control_draws or 1 for s in cfg.select.controls) + 1
        return (len(cfg.score.metrics) * len(cfg.seeds) * len(cfg.select.modes) * per_sel * len(cfg.select.topk)
                * len(cfg.perturb.names))

    # ---- pieces --------------------------------------------------------------------------------------
    def values(self, name: str) -> torch.Tensor:
        """Real-valued weights of an eligible parameter (dequantized for int8)."""
        return weight_values(self.params[name], self.modules.get(name))

    def mask_fn(self, pert: str):
        """name -> bool mask of the weights perturbation `pert` can change (selections draw only from them)."""
        cache: dict[str, torch.Tensor] = {}

        def fn(name: str) -> torch.Tensor:
            if name not in cache:
                cache.clear()  # one tensor's mask at a time (memory)
                cache[name] = changeable(pert, self.values(name), self.cfg.perturb)
            return cache[name]

        return fn

    def scores(self, metric: str, seed: int) -> dict[str, torch.Tensor]:
        """Score set for (metric, seed), from the content-addressed cache when possible."""
        spec = METRICS.get(metric)
        calib = self.windows.calib_idx(seed).tolist() if spec.needs_calibration else None
        key = score_key({
            "model": self.info.fingerprint, "data": self.windows.fingerprint if calib is not None else None,
            "calib": calib, "metric": metric, "params": {p: getattr(self.cfg.score, p) for p in spec.params},
            "names": list(self.params), "dtype": self.cfg.score.dtype,
            # CUDA scores run under bf16 autocast, CPU scores in fp32: never reuse one for the other
            "device": self.device.type,
        })
        self.score_keys = getattr(self, "score_keys", {})
        self.compact_keys = getattr(self, "compact_keys", {})
        ckey = self.compact_keys[(metric, seed)] = compact_key(key, self.ranking_spec(seed))
        self.score_keys[(metric, seed)] = ckey if self.cache.mode == "compact" else key
        dev = torch.device("cpu") if self.cfg.score.offload else self.device
        cached = self.cache.get(key, dev, ckey, list(self.params), [tuple(p.shape) for p in self.params.values()])
        if isinstance(cached, CompactScores):
            return cached
        if cached is not None:
            self.score_keys[(metric, seed)] = key
        if cached is not None and set(cached) == set(self.params):
            # safetensors returns keys sorted by name; rankings depend on the parameter order: restore it
            return {n: cached[n] for n in self.params}
        t = time.perf_counter()
        ids = self.windows.calib(seed)
        bs = self.cfg.score.batch_size
        ctx = ScoreContext(self.model, self.params, [ids[i : i + bs] for i in range(0, ids.size(0), bs)],
                           self.cfg.score, self.device, seed, self.progress)
        scores = compute_scores(metric, ctx)
        kill_point("score", f"{metric}.seed{seed}")
        dt = time.perf_counter() - t
        self.timings[f"score_{metric}_seed{seed}_s"] = dt
        self.tracker.log_stage(f"score/{metric}", dt)
        self.cache.put(key, scores, {"metric": metric, "seed": seed, "model": self.info.name})
        return scores

    def ranking_spec(self, seed: int) -> dict:
        """Everything a (metric, seed)'s rankings and summary depend on besides its scores and weights: the
        ranking seed, the selection options and the candidate sets (the key of a compact cache set)."""
        cfg = self.cfg
        groups = [[list(k), v] for k, v in mask_groups(cfg.perturb.names, cfg.perturb).items()]
        return {"seed": seed, "select": {k: v for k, v in asdict(cfg.select).items() if k != "save_top"},
                "groups": groups, "relative": cfg.perturb.relative, "top_saved": TOP_SAVED}

    def selections(self, metric: str, seed: int, mode: str, scores, mask, group: tuple = ()):
        """(selection, draw, K_max ranking): Top-K first, then each control; random controls draw
        select.control_draws times. A metric whose support is below the largest K warns once. Rankings are
        kept under (metric, seed, mode, selection, draw) for the first candidate set of the perturbations and
        with the set's perturbations appended (`group`) for any other."""
        kmax = max(self.cfg.select.topk)
        stored = scores.rankings if isinstance(scores, CompactScores) else None  # a compact cache hit
        top = stored[(mode, "top_k", 0, *group)] if stored is not None else \
            rank(scores, kmax, mode, "top_k", seed, mask_fn=mask, in_axis=self.in_axis)
        if top.support is not None and top.support < kmax and (metric, mode) not in getattr(self, "_warned", set()):
            self._warned = getattr(self, "_warned", set()) | {(metric, mode)}
            print(f"superweight: warning: {metric} gives {top.support} informative scores (its support) below "
                  f"K={kmax}: its Top-K stops at {top.support} (rows marked with `support`)", file=sys.stderr)
        self.rankings[(metric, seed, mode, "top_k", 0, *group)] = top
        if stored is None:
            top.stats["n_tied"] = self.ties_of(scores, top, mask)
        yield "top_k", 0, top
        for control in self.cfg.select.controls:
            spec = SELECTIONS.get(control)
            for draw in range(self.cfg.select.control_draws if spec.random else 1):
                if stored is not None:
                    r = stored[(mode, control, draw, *group)]
                else:
                    r = rank_grid(scores, self.cfg.select.topk, mode, control, seed, draw, mask_fn=mask, top=top,
                                  values=self.values, in_axis=self.in_axis)
                    r.stats["n_tied"] = self.ties_of(scores, r, mask)
                self.rankings[(metric, seed, mode, control, draw, *group)] = r
                yield control, draw, r

    def ties_of(self, scores, r: Ranking, mask) -> dict[int, int]:
        """{K: n_tied} of a ranking, one pass over the scores for the whole K grid: only for a global
        ranking ordered by its scores (a selection with a ranking key, not a uniform draw nor a match)."""
        spec = SELECTIONS.get(r.selection)
        if r.mode != "global" or spec.uniform or spec.needs_top:
            return {}
        return tied_counts(scores, r, self.cfg.select.topk, mask)

    def in_axis(self, name: str) -> int:
        """The input axis of an eligible weight (per_row groups weights by output neuron)."""
        return input_axis(self.model, name)

    def evaluate(self) -> dict:
        ids, labels = self.windows.eval_inputs()
        res = evaluate_lm(self.model, ids, labels, self.cfg.eval.batch_size, progress=False).as_dict()
        bos = self.tok.bos_token_id if self.windows.bos_mode != "never" else None
        for task in self.cfg.eval.tasks:
            for k, v in TASKS.get(task).fn(self.model, self.tok, self.cfg.eval.task_limit, self.cfg.eval.batch_size,
                                           bos).items():
                res[f"{task}/{k}"] = v
        return res

    def perturb_evaluate(self, sel: Ranking, scores, mask, pert: str, seed: int, memo: dict, keys: dict) -> dict:
        """Perturb the selection, evaluate, restore (bit-exact, in a finally); one result row."""
        by_param = sel.by_param()
        h = hashlib.sha256()
        for n in sorted(by_param):
            h.update(n.encode())
            h.update(by_param[n].numpy().tobytes())
        mkey = (h.hexdigest(), pert, seed if PERTURBATIONS.get(pert).stochastic else None)
        if mkey not in memo:  # identical selections (random_k across metrics, Top-K past the support) run once
            with perturbed(self.params, by_param, pert, self.cfg.perturb, seed) as pinfo:
                # No stored bit changed: the model is the baseline model, so are its results
                res = dict(self.baseline) if pinfo["bits_changed"] == 0 else self.evaluate()
            memo[mkey] = (res, pinfo)
        res, pinfo = memo[mkey]
        extra = {"n_selected": len(sel), "support": sel.support,
                 "n_tied": sel.stats.get("n_tied", {}).get(keys["k"])}
        extra.update(match_quality(sel))
        return make_row(keys, dict(res), self.baseline, pinfo, extra)

    def summarize_scores(self, metric: str, seed: int, scores) -> None:
        """What goes to sensitivity_scores.safetensors (core/score_summary.py; stored in a compact set)."""
        self.summaries[f"{metric}.seed{seed}"] = scores.summary if isinstance(scores, CompactScores) else \
            score_summary(scores, TOP_SAVED)

    def collect(self) -> Result:
        """Stability (Top-K sets within each metric's support) and gaps, as a Result."""
        cfg = self.cfg
        sets = {}
        for (metric, seed, mode, selection, draw, *group), r in self.rankings.items():
            if selection == "top_k" and not group:  # stability of the first candidate set's Top-K
                sets[(metric, seed, mode)] = {k: r.take(k) for k in cfg.select.topk
                                              if r.support is None or k <= r.support}
        stab = stability_pairs(sets, cfg.score.metrics, cfg.seeds, cfg.select.modes, cfg.select.topk, jaccard)
        w = self.windows
        return Result(
            cfg=cfg, config_hash=self.chash, baseline=self.baseline, rows=self.rows, rankings=self.rankings,
            stability=stab, gaps=gaps(self.rows, self.baseline), score_summaries=self.summaries,
            params=self.params, values=self.values, model=self.info.__dict__,
            data={"corpus": cfg.data.corpus, "protocol": w.protocol, "bos": w.bos_mode, "fingerprint": w.fingerprint,
                  "tokens": w.n_tokens, "eval_windows": len(w.eval_idx), "eval_window_index": w.eval_idx.tolist(),
                  "calib_pool": len(w.pool_idx), "calib_windows": {s: w.calib_idx(s).tolist() for s in cfg.seeds}},
            timings={"start": self.started, "end": now(), **{k: round(v, 3) for k, v in self.timings.items()}},
            extra={"device": str(self.device), "code_version": code_version(),
                   "score_cache": {"hits": self.cache.hits, "misses": self.cache.misses},
                   "score_keys": {f"{m}.seed{s}": k for (m, s), k in getattr(self, "score_keys", {}).items()},
                   "wandb": self.tracker.info(), "out_dir": str(Path(self.out).resolve())},
        )
