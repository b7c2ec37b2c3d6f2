"""The experiment as a recipe (`Experiment.run`, one screen):

    setup    validate the config and every capability against a model built from its config alone, and
             the data with the tokenizer; create out_dir     (bad input: one line, nothing written)
    track    tracker.start()                                 (the W&B run is live from here)
    load     weights; capabilities again on the real parameters
    baseline evaluate the unperturbed model once
    loop     the plan of row keys (rows.py), walked in order: for metric, seed: scores (cached)
               for mode, candidate set: Top-K, then the controls (random_k / matched_k: several draws)
                 for K, perturbation: perturb -> evaluate -> restore (bit-exact), one row, logged as it ends
    collect  stability, gaps with confidence intervals        (core/gaps.py, stability.py: pure tables)
    write    sink.write(result): result files, plots, manifest (edge: outputs.py); returns the paths
    publish  tracker.finish(result, paths): tables and artifacts (edge: tracking.py)

Each stage returns a declared value (Prepared, Loaded, Looped, Result); the experiment keeps the first two.

Research question: do a few weights control the model, and which metric finds them? The answer is the gap
between Top-K and the controls at equal K under the same perturbation, with its confidence interval.

The loop never imports the edge: the command (commands/run.py) hands it a tracker and a sink. Each finished
row is appended to `out_dir/.progress.jsonl` (resume.ResumeLog), so a killed run resumes where it stopped
(rows are reused only if the config hash, code version included, is identical).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import EvalConfig, RunConfig, config_hash
from ..core.evaluation import TASKS, evaluate_lm
from ..core.metrics import METRICS, ScoreContext, compute_scores
from ..core.experts import input_axis
from ..core.gaps import gaps
from ..core.scan import ScoreSet
from ..core.score_summary import score_summary
from ..core.candidates import Changeable
from ..core.matching import Shared, match_quality
from ..core.overlap import jaccard, tied_counts
from ..core.params import eligible_parameters, owner, weight_values
from ..core.perturbation import PERTURBATIONS, perturbed
from ..core.ranking import Ranking, gather
from ..core.results import make_row
from ..core.selections import SELECTIONS, rank, rank_grid
from ..core.stability import stability_pairs
from ..files import kill_point, remove_stale_temps
from ..inputs.data import Windows, build_windows
from ..inputs.models import (bos_every_window, build_fake_model, load_model_config, load_tokenizer,
                             load_weights, model_context, model_info, pick_device, pick_dtype)
from ..resources import cache_root, code_version
from .cache import CompactScores, ScoreCache, compact_key, score_key
from .resume import ResumeLog, now
from .result import Result, Sink, Tracker, saved_weight_values
from .rows import RowKey, candidate_rules, candidate_sets, plan_rows
from .stages import Loaded, Looped, Prepared
from .validation import check_capabilities, prepare_out_dir, validate

TOP_SAVED = 10_000  # top entries per (metric, seed) kept in sensitivity_scores.safetensors


def evaluate_all(model, tokenizer, windows: Windows, cfg: EvalConfig) -> dict:
    """Perplexity on the evaluation windows, plus every downstream task (`task/metric` keys); the tasks get
    a BOS exactly when the windows do."""
    ids, labels = windows.eval_inputs()
    res = evaluate_lm(model, ids, labels, cfg.batch_size, progress=False).as_dict()
    bos = tokenizer.bos_token_id if windows.bos_mode != "never" else None
    for task in cfg.tasks:
        for k, v in TASKS.get(task).fn(model, tokenizer, cfg.task_limit, cfg.batch_size, bos).items():
            res[f"{task}/{k}"] = v
    return res


@dataclass
class Experiment:
    cfg: RunConfig
    progress: bool = True
    tracker: Tracker = field(default_factory=Tracker)
    sink: Sink = field(default_factory=Sink)
    timings: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)  # more capability checks (model, eligible params) -> raise ConfigError
    prepared: Prepared | None = field(default=None, init=False)  # setup's value
    loaded: Loaded | None = field(default=None, init=False)  # load's value
    baseline: dict | None = field(default=None, init=False)  # the unperturbed model's evaluation
    held: tuple | None = field(default=None, init=False)  # (cache key, score set) of the last set computed

    # ---- the recipe -------------------------------------------------------------------------------------
    def run(self) -> Result:
        t0, started = time.perf_counter(), now()
        self.prepared = self.setup()
        self.tracker.start(self)
        try:
            self.loaded = self.load()
            self.baseline = self.log.get(("baseline",)) or self.log.record(("baseline",), self.evaluate())
            print(f"baseline: ppl={self.baseline['ppl']:.3f} nll={self.baseline['nll']:.4f} acc={self.baseline['acc']:.4f}")
            plan = plan_rows(self.cfg)
            bar = tqdm(total=len(plan), desc="perturb+evaluate", unit="row", disable=not self.progress)
            try:
                looped = self.loop(plan, bar)
            finally:
                bar.close()  # a stop message never lands on the bar's line
                self.held = None  # the last score set, also when the loop stops
            self.timings["total_s"] = time.perf_counter() - t0
            result = self.collect(looped, started)
            files = self.sink.write(result)
            kill_point("publish")
            self.tracker.finish(result, files)
            return result
        except BaseException as e:
            self.tracker.fail(e)
            raise

    def loop(self, plan: list[RowKey], bar) -> Looped:
        """Walk the plan: scores once per (metric, seed), one ranking per (mode, candidate set, selection,
        draw), one row per key (reused from the resume log when it is there)."""
        out, memo, warned = Looped(), {}, set()
        sets = candidate_sets(self.cfg.perturb.names, self.cfg.perturb)
        # per candidate set, for every metric and seed: mask counts, matched_k's windows/pools, uniform draws
        masks = {c: self.mask_fn(perts[0]) for c, perts in sets.items()}
        shared = {c: (Shared(), {}) for c in sets}
        done, total = 0, len(plan)  # counted here: a disabled progress bar counts nothing
        for (metric, seed), by_scores in groupby(plan, lambda r: (r.metric, r.seed)):
            scores, out.score_keys[(metric, seed)], compact = self.scores(metric, seed)
            for (mode, candidates), by_set in groupby(by_scores, lambda r: (r.mode, r.candidates)):
                mask, top = masks[candidates], None
                for (selection, draw), keys in groupby(by_set, lambda r: (r.selection, r.draw)):
                    r = self.ranking(scores, seed, mode, candidates, selection, draw, mask, top, *shared[candidates])
                    if selection == "top_k":
                        top = r
                        self.warn_support(metric, mode, r, warned)
                    out.rankings[(metric, seed, mode, selection, draw, candidates)] = r
                    for key in keys:
                        row = self.log.get(key.log_key)
                        if row is None:
                            row = self.log.record(key.log_key, self.perturb_evaluate(
                                r.take(key.k), scores, mask, key.perturbation, seed, memo, key.columns()))
                        out.rows.append(row)
                        done += 1
                        bar.update()
                        self.tracker.log_row(row, done, total)
            out.summaries[f"{metric}.seed{seed}"] = summary = self.summarize_scores(scores)
            if not isinstance(scores, CompactScores):  # what a rerun reads instead of the scores
                self.loaded.cache.put_compact(compact, CompactScores(
                    list(self.params), {(*k[2:5], self.rules[k[5]]): r for k, r in out.rankings.items()
                                        if k[:2] == (metric, seed)},
                    summary), {"metric": metric, "seed": seed, "model": self.loaded.info.name})
            del scores
        return out

    # ---- setup: everything that can fail on bad input happens before the weights load -----------------
    def setup(self, resume_log: bool = True) -> Prepared:
        """Validate, check every capability (and `self.checks`) on a model built from its config alone,
        build the data, create out_dir and (`resume_log`) open its resume log."""
        cfg = validate(self.cfg)
        t = time.perf_counter()
        device = pick_device(cfg.model.device)
        fake_mode, fake = build_fake_model(load_model_config(cfg.model, cfg.cache_dir),
                                           pick_dtype(cfg.model.dtype, device), cfg.model.attn_implementation,
                                           cfg.model.trust_remote_code)
        fake_params = eligible_parameters(fake, cfg.score.include, cfg.score.exclude)
        check_capabilities(cfg, fake, fake_params)
        for check in self.checks:
            check(fake, fake_params)
        # the data too (context, corpus size, encoding): only the tokenizer is needed, no weights
        tok = load_tokenizer(cfg.model, cfg.cache_dir)
        windows = build_windows(cfg.data, tok, cfg.cache_dir, context=model_context(fake),
                                bos_every_window=bos_every_window(fake))
        del fake, fake_mode
        self.timings["validate_s"] = time.perf_counter() - t
        out = prepare_out_dir(cfg.out_dir)
        remove_stale_temps(out)  # temp files of a run killed mid-write (never reported as outputs)
        chash = config_hash(cfg, code_version())
        log = ResumeLog(out, chash, cfg.resume) if resume_log else None
        if log is not None and len(log):
            print(f"resuming: {len(log)} finished rows reused from {log.path}")
        return Prepared(tokenizer=tok, windows=windows, device=device, out=out, config_hash=chash, log=log)

    def load(self) -> Loaded:
        cfg = self.cfg
        t = time.perf_counter()
        model = load_weights(cfg.model, cfg.cache_dir, self.device)
        params = eligible_parameters(model, cfg.score.include, cfg.score.exclude)
        check_capabilities(cfg, model, params, quantize="none")  # the real storage now
        for check in self.checks:
            check(model, params)
        modules = {n: owner(model, n)[1] for n in params}
        self.timings["load_s"] = time.perf_counter() - t
        self.tracker.log_stage("load", self.timings["load_s"])
        t = time.perf_counter()
        info = model_info(model, cfg.model, params)
        cache = ScoreCache(cache_root(cfg.cache_dir), cfg.score.cache)
        self.timings["data_s"] = time.perf_counter() - t
        self.tracker.log_stage("data", self.timings["data_s"])
        return Loaded(model=model, params=params, modules=modules, info=info, cache=cache)

    def n_rows(self) -> int:
        return len(plan_rows(self.cfg))

    # ---- what the stages made, by name ----------------------------------------------------------------
    @property
    def out(self) -> Path | None:
        return self.prepared.out if self.prepared else None

    @property
    def log(self) -> ResumeLog | None:
        return self.prepared.log if self.prepared else None

    @property
    def chash(self) -> str | None:
        return self.prepared.config_hash if self.prepared else None

    @property
    def windows(self) -> Windows:
        return self.prepared.windows

    @property
    def tok(self):
        return self.prepared.tokenizer

    @property
    def device(self) -> torch.device:
        return self.prepared.device

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.loaded.params

    # ---- pieces --------------------------------------------------------------------------------------
    def values(self, name: str) -> torch.Tensor:
        """Real-valued weights of an eligible parameter (dequantized for int8)."""
        return weight_values(self.params[name], self.loaded.modules.get(name))

    @property
    def rules(self) -> dict[str, str]:
        """{candidate-set name: its rule}: the compact cache keys a candidate set's rankings by its rule."""
        return candidate_rules(self.cfg.perturb.names, self.cfg.perturb)

    def mask_fn(self, pert: str) -> Changeable:
        """name -> bool mask of the weights perturbation `pert` can change (selections draw only from them)."""
        return Changeable(pert, self.values, self.cfg.perturb)

    def scores(self, metric: str, seed: int) -> tuple[dict[str, torch.Tensor] | CompactScores, str, str]:
        """(score set or its compact cache set, the cache key it is recorded under, its compact key) for
        (metric, seed), from the content-addressed cache when possible."""
        spec = METRICS.get(metric)
        calib = self.windows.calib_idx(seed).tolist() if spec.needs_calibration else None
        key = score_key({
            "model": self.loaded.info.fingerprint, "data": self.windows.fingerprint if calib is not None else None,
            "calib": calib, "metric": metric, "params": {p: getattr(self.cfg.score, p) for p in spec.params},
            "names": list(self.params), "dtype": self.cfg.score.dtype,
            # CUDA scores run under bf16 autocast, CPU scores in fp32: never reuse one for the other
            "device": self.device.type,
        })
        compact = compact_key(key, self.ranking_spec(seed))
        recorded = compact if self.loaded.cache.mode == "compact" else key
        dev = torch.device("cpu") if self.cfg.score.offload else self.device
        reuse = self.held is not None and self.held[0] == key  # the last set again (a metric that reads no
        if not reuse:                                           # calibration data: one set for every seed)
            self.held = None  # freed before another set is loaded or made (memory: one set at a time)
        cached = self.loaded.cache.get(key, dev, compact, list(self.params), [tuple(p.shape) for p in self.params.values()],
                                       full=not reuse)
        if isinstance(cached, CompactScores):
            return cached, recorded, compact
        if reuse:
            return self.held[1], recorded, compact
        if cached is not None:
            recorded = key
        if cached is not None and set(cached) == set(self.params):
            # safetensors returns keys sorted by name; rankings depend on the parameter order: restore it
            return ScoreSet({n: cached[n] for n in self.params}), key, compact
        t = time.perf_counter()
        ids = self.windows.calib(seed)
        bs = self.cfg.score.batch_size
        ctx = ScoreContext(self.model, self.params, [ids[i : i + bs] for i in range(0, ids.size(0), bs)],
                           self.cfg.score, self.device, seed, self.progress)
        scores = ScoreSet(compute_scores(metric, ctx))  # its scan is shared by the summary, rankings, ties
        kill_point("score", f"{metric}.seed{seed}")
        dt = time.perf_counter() - t
        self.timings[f"score_{metric}_seed{seed}_s"] = dt
        self.tracker.log_stage(f"score/{metric}", dt)
        self.loaded.cache.put(key, scores, {"metric": metric, "seed": seed, "model": self.loaded.info.name})
        self.held = (key, scores)
        return scores, recorded, compact

    def ranking_spec(self, seed: int) -> dict:
        """Everything a (metric, seed)'s rankings and summary depend on besides its scores and weights: the
        ranking seed, the selection options and the candidate sets (the key of a compact cache set)."""
        cfg = self.cfg
        rules = sorted(set(candidate_rules(cfg.perturb.names, cfg.perturb).values()))
        return {"seed": seed, "select": {k: v for k, v in asdict(cfg.select).items() if k != "save_top"},
                "candidate_rules": rules, "top_saved": TOP_SAVED}

    def ranking(self, scores, seed: int, mode: str, candidates: str, selection: str, draw: int, mask,
                top: Ranking | None, shared: Shared | None = None, drawn: dict | None = None) -> Ranking:
        """The largest K's ranking of one selection: Top-K nests (any K is a prefix); a control is drawn
        for the whole K grid (`rank_grid`: matched_k draws each K against that K's Top-K set `top`, sharing
        `shared`, the candidate set's exact |w| windows and pools). A uniform global draw depends on no score:
        `drawn` keeps it for the other metrics (each gets its own scores of the drawn weights)."""
        if isinstance(scores, CompactScores):  # a compact cache hit: the rankings themselves
            return scores.rankings[(mode, selection, draw, self.rules[candidates])]
        uniform = drawn is not None and mode == "global" and SELECTIONS.get(selection).uniform
        if uniform and (seed, selection, draw) in drawn:
            r0 = drawn[(seed, selection, draw)]
            r = replace(r0, score=gather(scores, r0.names, r0.pid, r0.flat), stats=dict(r0.stats))
        elif selection == "top_k":
            r = rank(scores, max(self.cfg.select.topk), mode, "top_k", seed, mask_fn=mask, in_axis=self.in_axis)
        else:
            r = rank_grid(scores, self.cfg.select.topk, mode, selection, seed, draw, mask_fn=mask, top=top,
                          values=self.values, in_axis=self.in_axis, shared=shared)
        if uniform and (seed, selection, draw) not in drawn:
            drawn[(seed, selection, draw)] = replace(r, stats=dict(r.stats))
        r.stats["n_tied"] = self.ties_of(scores, r, mask)
        return r

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

    def warn_support(self, metric: str, mode: str, top: Ranking, warned: set) -> None:
        """Warn once per (metric, mode) when the metric's support is below the largest K."""
        k_max = max(self.cfg.select.topk)
        if top.support is not None and top.support < k_max and (metric, mode) not in warned:
            warned.add((metric, mode))
            print(f"superweight: warning: {metric} gives {top.support} informative scores (its support) below "
                  f"K={k_max}: its Top-K stops at {top.support} (rows marked with `support`)", file=sys.stderr)

    def evaluate(self) -> dict:
        return evaluate_all(self.model, self.tok, self.windows, self.cfg.eval)

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
        extra = {"n_selected": len(sel), "support": sel.support, "n_tied": sel.stats.get("n_tied", {}).get(keys["k"])}
        extra.update(match_quality(sel))
        return make_row(keys, dict(res), self.baseline, pinfo, extra)

    def summarize_scores(self, scores) -> dict[str, torch.Tensor]:
        """What goes to sensitivity_scores.safetensors (core/score_summary.py; stored in a compact set), once
        per score set (a set shared by several seeds has one summary)."""
        if isinstance(scores, CompactScores):
            return scores.summary
        if scores.summary is None:
            scores.summary = score_summary(scores, TOP_SAVED)
        return scores.summary

    def collect(self, looped: Looped, started: str) -> Result:
        """Stability (Top-K sets within each metric's support) and gaps, as a Result."""
        cfg = self.cfg
        cand_sets = list(candidate_sets(cfg.perturb.names, cfg.perturb))
        sets = {}
        for (metric, seed, mode, selection, draw, candidates), r in looped.rankings.items():
            if selection == "top_k" and candidates == cand_sets[0]:  # stability of the main candidate set's Top-K
                sets[(metric, seed, mode)] = {k: r.take(k) for k in cfg.select.topk
                                              if r.support is None or k <= r.support}
        stab = stability_pairs(sets, cfg.score.metrics, cfg.seeds, cfg.select.modes, cfg.select.topk, jaccard)
        w = self.windows
        return Result(
            cfg=cfg, config_hash=self.chash, baseline=self.baseline, rows=looped.rows, rankings=looped.rankings,
            candidate_sets=cand_sets, stability=stab, gaps=gaps(looped.rows, self.baseline),
            score_summaries=looped.summaries, param_shapes={n: tuple(p.shape) for n, p in self.params.items()},
            weight_values=saved_weight_values(looped.rankings, cfg.select.save_top, self.values), model=self.loaded.info.__dict__,
            data={"corpus": cfg.data.corpus, "protocol": w.protocol, "bos": w.bos_mode, "fingerprint": w.fingerprint,
                  "tokens": w.n_tokens, "eval_windows": len(w.eval_idx), "eval_window_index": w.eval_idx.tolist(),
                  "calib_pool": len(w.pool_idx), "calib_windows": {s: w.calib_idx(s).tolist() for s in cfg.seeds}},
            timings={"start": started, "end": now(), **{k: round(v, 3) for k, v in self.timings.items()}},
            extra={"device": str(self.device), "code_version": code_version(),
                   "score_cache": {"hits": self.loaded.cache.hits, "misses": self.loaded.cache.misses},
                   "score_keys": {f"{m}.seed{s}": k for (m, s), k in looped.score_keys.items()},
                   "wandb": self.tracker.info(), "out_dir": str(Path(self.out).resolve())},
        )
