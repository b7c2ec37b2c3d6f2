"""Benchmark of the scale-critical paths; every figure is a ratio of two timings (or memories) taken in the
same run, so it means the same on any machine:

  grad_metric / fwd_bwd        grad_x_weight pass (post-accumulate-grad hooks, fp32 score buffers) over the
                               same calibration tokens as a plain forward+backward into .grad  (target <= 1.15)
  hutchinson / fwd_bwd         hutchinson_diag with 1 probe, and the marginal cost of one more probe (<= 2.5)
  topk merged / naive          global top-K (per-tensor pruning + merge) vs concatenate-all-then-topk:
                               time and peak extra memory (bytes of storages created, via simulation.MemoryTracker)
  perturb+restore              `perturbed(...)` enter+exit for K = 10, 1000, 100000 random weights, on the
                               model and on a 2-layer model: time ratio big / small (O(K), size-independent)
  eval / reference             evaluate_lm tokens/s vs a plain batched loop at equal batch size, and the
                               relative perplexity difference
  cache hit / miss             score-set load from the content-addressed cache vs computing + storing it
  run                          (--parts run) a whole `superweight run` split into load, scoring, selection
                               (rankings incl. matching and tie counts), summary (score summary and
                               histogram), cache, evaluation, writing, tracking and the rest (perturb+restore,
                               the loop); its share of the wall time, and the score-cache bytes it added
  peak memory / plan           (--parts memory, CUDA) measured peak of each metric and of evaluation vs what
                               `superweight plan` predicts for the same model, seq_len and batch

    python scripts/bench.py                          # the shipped model on CPU
    python scripts/bench.py --model <dir|hub id> --device cuda --seq-len 2048 --json bench.json
    # Llama-3.1-8B shapes, random init from its config.json (no weights), bf16 on one GPU:
    python scripts/bench.py --model scripts/configs/llama-3.1-8b --random-init --device cuda --dtype bfloat16 \
        --seq-len 1024 --calib-batches 1 --parts gradient,memory,eval --json bench-8b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from superweight.run.cache import ScoreCache, score_key  # noqa: E402
from superweight.config import ModelConfig, PerturbConfig, ScoreConfig  # noqa: E402
from superweight.core.evaluation import evaluate_lm  # noqa: E402
from superweight.run.simulation import MemoryTracker  # noqa: E402
from superweight.core.metrics import METRICS, ScoreContext, grads_only_for, lm_loss  # noqa: E402
from superweight.inputs.models import load_model, pick_device, pick_dtype  # noqa: E402
from superweight.core.params import autocast_ctx, eligible_parameters, fingerprint, input_device  # noqa: E402
from superweight.core.perturbation import perturbed  # noqa: E402
from superweight.core.selections import rank  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1) -> float:
    """Median wall time of `repeats` calls of fn()."""
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def calib_batches(vocab: int, n: int, bs: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (bs, T), generator=g) for _ in range(n)]


def plain_fwd_bwd(model, params, batches, device) -> None:
    """Reference: forward + backward of the same loss into .grad for the same weights, grads then dropped."""
    with grads_only_for(model, params):
        for ids in batches:
            with autocast_ctx(device, model):
                loss = lm_loss(model, ids)
            loss.backward()
        for p in params.values():
            p.grad = None


def bench_gradient(model, params, batches, device, repeats, hutchinson: bool = True) -> dict:
    cfg = ScoreConfig()
    ctx = ScoreContext(model, params, batches, cfg, device, 0, False)
    run_metric = lambda: METRICS["grad_x_weight"].fn(ctx)  # noqa: E731
    run_plain = lambda: plain_fwd_bwd(model, params, batches, device)  # noqa: E731
    run_plain()  # warm-up
    t_metric, t_plain = [], []
    for _ in range(repeats):  # interleaved, so load drifts hit both alike
        t_plain.append(timed(run_plain, device))
        t_metric.append(timed(run_metric, device))
    fb, gm = statistics.median(t_plain), statistics.median(t_metric)
    out = {"fwd_bwd_s": fb, "grad_x_weight_s": gm, "ratio": gm / fb, "target": 1.15}
    if hutchinson:
        def hutch(p):
            c = ScoreConfig(probes=p)
            return timed(lambda: METRICS["hutchinson_diag"].fn(ScoreContext(model, params, batches, c, device, 0, False)), device)
        h1, h2 = hutch(1), hutch(2)
        out.update({"hutchinson_1probe_s": h1, "hutchinson_2probe_s": h2, "hutchinson_1probe_ratio": h1 / fb,
                    "hutchinson_marginal_probe_ratio": (h2 - h1) / fb,
                    "hutchinson_per_probe_ratio_at_2": h2 / 2 / fb, "hutchinson_target": 3.0,
                    "hutchinson_marginal_target": 2.0})
    return out


def bench_topk(n_tensors: int, rows: int, cols: int, ks: list[int], device) -> dict:
    g = torch.Generator().manual_seed(0)
    scores = {f"model.layers.{i}.mlp.w": torch.rand(rows, cols, generator=g).to(device) for i in range(n_tensors)}
    # quantize to a grid so ties are common (like magnitudes of a 4-bit model)
    for s in scores.values():
        s.mul_(4096).floor_()
    out = {"n_tensors": n_tensors, "shape": [rows, cols], "n_weights": n_tensors * rows * cols,
           "score_bytes": n_tensors * rows * cols * 4}
    for k in ks:
        def merged():
            return rank(scores, k, "global", "top_k")

        def naive():
            allv = torch.cat([s.reshape(-1) for s in scores.values()])
            return torch.topk(allv, k)

        res = {}
        for name, fn in (("merged", merged), ("naive", naive)):
            tr = MemoryTracker()
            tr.known(list(scores.values()))
            with tr.track():
                r = fn()
                del r
            res[f"{name}_peak_bytes"] = tr.peak
            res[f"{name}_s"] = timed(fn, device)
        res["time_ratio"] = res["merged_s"] / res["naive_s"]
        res["mem_ratio"] = res["merged_peak_bytes"] / res["naive_peak_bytes"]
        out[f"K={k}"] = res
    return out


def bench_perturb(models: dict, ks: list[int], repeats: int) -> dict:
    """models: {label: (params, n_eligible)}; random-K selections spread over all tensors (the worst case)."""
    out = {}
    for label, params in models.items():
        n_el = sum(p.numel() for p in params.values())
        row = {"n_eligible": n_el, "n_tensors": len(params)}
        scores = {n: torch.zeros(p.shape) for n, p in params.items()}
        for k in ks:
            if k > n_el:
                continue
            sel = rank(scores, k, "global", "random_k", seed=1).by_param()
            cfg = PerturbConfig()

            def once():
                with perturbed(params, sel, "zero", cfg, 0):
                    pass

            once()
            row[f"K={k}_ms"] = 1000 * timed(once, "cpu", repeats)
            row[f"K={k}_tensors_touched"] = len(sel)
            # the same K inside one tensor (a concentrated Top-K): cost without the per-tensor overhead
            first = next(iter(params))
            n1 = params[first].numel()
            if k <= n1:
                sel1 = {first: torch.linspace(0, n1 - 1, k).long().unique()}

                def once1():
                    with perturbed(params, sel1, "zero", cfg, 0):
                        pass

                once1()
                row[f"K={k}_one_tensor_ms"] = 1000 * timed(once1, "cpu", repeats)
        out[label] = row
    labels = list(models)
    if len(labels) >= 2:
        big, small = out[labels[0]], out[labels[-1]]
        out["size_ratio_big_over_small"] = {k: big[k] / small[k] for k in big if k.endswith("_ms") and k in small}
    return out


def reference_eval(model, ids: torch.Tensor, batch_size: int) -> tuple[float, float, int]:
    """Plain loop computing the same numbers (NLL and top-1 accuracy): batched forward, fp32 log-softmax over
    the whole batch at once, gather, argmax; float64 sums."""
    dev = input_device(model)
    nll, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for s in range(0, ids.size(0), batch_size):
            x = ids[s : s + batch_size].to(dev)
            with autocast_ctx(dev, model):
                logits = model(input_ids=x).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1)
            y = x[:, 1:]
            nll -= float(logp.gather(-1, y.unsqueeze(-1)).double().sum())
            correct += int((logits.argmax(-1) == y).sum())
            n += y.numel()
    return nll / n, correct / n, n


def bench_eval(model, ids, batch_size, device, repeats) -> dict:
    evaluate_lm(model, ids[:batch_size], batch_size=batch_size)  # warm-up
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        r = evaluate_lm(model, ids, batch_size=batch_size)
        sync(device)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref_nll, ref_acc, n = reference_eval(model, ids, batch_size)
        sync(device)
        t_ref.append(time.perf_counter() - t)
    ours_tps, ref_tps = n / statistics.median(t_ours), n / statistics.median(t_ref)
    return {"tokens": n, "batch_size": batch_size, "ours_tokens_per_s": ours_tps, "reference_tokens_per_s": ref_tps,
            "ratio": ours_tps / ref_tps, "ppl": r.ppl, "reference_ppl": math.exp(ref_nll),
            "ppl_rel_diff": abs(r.ppl - math.exp(ref_nll)) / math.exp(ref_nll), "acc": r.acc, "reference_acc": ref_acc}


def bench_run(model_name: str, extra: list[str], tracking: str) -> dict:
    """One whole run of `superweight run model=<model_name> <extra>` in a fresh out_dir with an empty score
    cache, each stage timed by wrapping the functions the recipe calls (the wrappers only add perf_counter
    calls). The model's and the data's caches are warmed first, untimed (`first_setup_s`: a converted GGUF
    checkpoint, the tokenized corpus), as every run but a machine's first finds them."""
    from collections import defaultdict

    import superweight.run.experiment as E
    from superweight.arguments import parse_config
    from superweight.commands.run import make_experiment, run_experiment
    from superweight.edge.outputs import RunOutputs

    clock: dict[str, float] = defaultdict(float)
    depth = [0]

    def wrap(cat, fn):
        def w(*args, **kw):
            if depth[0]:  # nested inside another timed call: counted there
                return fn(*args, **kw)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                clock[cat] += time.perf_counter() - t
                depth[0] -= 1
        return w

    targets = [(E, "compute_scores", "scoring"), (E, "rank", "selection"), (E, "rank_grid", "selection"),
               (E.Experiment, "ties_of", "selection"), (E, "score_summary", "summary"),
               (E.Experiment, "evaluate", "evaluation"), (E.Experiment, "setup", "load"), (E.Experiment, "load", "load"),
               (E.ScoreCache, "get", "cache"), (E.ScoreCache, "put", "cache"), (E.ScoreCache, "put_compact", "cache"),
               (RunOutputs, "write", "writing")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    with tempfile.TemporaryDirectory() as d:
        argv = [f"model={model_name}", f"out_dir={d}/out", f"cache_dir={d}/cache", f"wandb.mode={tracking}",
                f"wandb.dir={d}/wandb", *extra]
        t0 = time.perf_counter()  # the warm-up, before any stage is wrapped
        warm = make_experiment(parse_config([*argv, f"out_dir={d}/warm", "wandb.mode=disabled"]), progress=False)
        warm.prepared = warm.setup(resume_log=False)
        warm.loaded = warm.load()
        first_setup = time.perf_counter() - t0
        del warm
        try:
            for obj, name, cat in targets:
                setattr(obj, name, wrap(cat, getattr(obj, name)))
            t0 = time.perf_counter()
            exp = make_experiment(parse_config(argv), progress=False)
            for name in ("start", "log_row", "log_stage", "finish"):
                setattr(exp.tracker, name, wrap("tracking", getattr(exp.tracker, name)))
            result = run_experiment(exp)
            total = time.perf_counter() - t0
        finally:
            for obj, name, fn in saved:
                setattr(obj, name, fn)
        cache_bytes = sum(p.stat().st_size for p in Path(d, "cache", "scores").glob("*.safetensors"))
        out_bytes = sum(p.stat().st_size for p in Path(d, "out").rglob("*") if p.is_file())
    stages = dict(clock)
    stages["other"] = total - sum(clock.values())
    share = {k: v / total for k, v in stages.items()}
    return {"argv": extra, "rows": len(result.rows), "n_eligible": sum(p.numel() for p in exp.params.values()),
            "first_setup_s": first_setup, "total_s": total, "stages_s": stages, "share": share,
            "bookkeeping_share": 1 - share.get("scoring", 0) - share.get("evaluation", 0),
            "cache_bytes": cache_bytes, "score_sets": len(exp.cfg.score.metrics) * len(exp.cfg.seeds),
            "out_dir_bytes": out_bytes}


def run_line(name: str, r: dict) -> str:
    """One line of a --parts run result: total, each stage's share, and everything but scoring + evaluation."""
    parts = ", ".join(f"{k} {v:.1%}" for k, v in sorted(r["share"].items(), key=lambda kv: -kv[1]))
    return (f"{name}: {r['rows']} rows, {r['n_eligible'] / 1e6:.0f}M weights, {r['total_s']:.1f} s "
            f"(first setup {r['first_setup_s']:.1f} s, untimed): {parts}; all but scoring and evaluation "
            f"{r['bookkeeping_share']:.1%}")


def save_random_model(config_path: str, like: str, out: Path) -> str:
    """A random-init checkpoint of `config_path` with the tokenizer of `like`, saved to `out` (for --parts run
    at a larger size: the run loads weights and a tokenizer from a directory)."""
    from superweight.inputs.models import load_tokenizer

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    load_tokenizer(ModelConfig(name=like)).save_pretrained(out)
    return str(out)


def bench_cache(model, params, batches, device) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cache = ScoreCache(d, "full")
        key = score_key({"model": fingerprint(model), "metric": "grad_x_weight", "bench": True})
        t = time.perf_counter()
        got = cache.get(key, device)
        if got is None:
            scores = METRICS["grad_x_weight"].fn(ScoreContext(model, params, batches, ScoreConfig(), device, 0, False))
            cache.put(key, scores)
        sync(device)
        miss = time.perf_counter() - t
        t = time.perf_counter()
        got = cache.get(key, device)
        sync(device)
        hit = time.perf_counter() - t
        same = got is not None and all(torch.equal(got[n].cpu(), scores[n].cpu()) for n in scores)
        return {"miss_s": miss, "hit_s": hit, "ratio": hit / miss, "hits": cache.hits, "misses": cache.misses,
                "identical": same}


def random_init_model(path: str, device: str, dtype: str):
    """A model built from `path`/config.json alone, random init, directly on `device` (no weights read): the
    shapes, dtypes and kernels of the real checkpoint, which is all that time and memory depend on."""
    dev = pick_device(device)
    config = AutoConfig.from_pretrained(path)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, dev))
    return model.eval(), dev


def bench_memory(model, params, metrics: list[str], seq_lens: list[int], eval_batch: int, device) -> dict:
    """Measured CUDA peak (torch.cuda.max_memory_allocated, weights included) and wall time of each metric on
    one calibration window of each seq_len, batch 1, default ScoreConfig (fp32 score buffers on the GPU), and of
    evaluation at `eval_batch` windows: the figures `superweight plan` predicts for the same model and options."""
    vocab = model.get_input_embeddings().weight.shape[0]
    weights = torch.cuda.memory_allocated()
    out = {"weights_bytes": weights, "device_name": torch.cuda.get_device_name(device), "total_bytes":
           torch.cuda.get_device_properties(device).total_memory}
    for T in seq_lens:
        batches = calib_batches(vocab, 1, 1, T, seed=2)
        for name in metrics + ["evaluation"]:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t = time.perf_counter()
            try:
                if name == "evaluation":
                    ids = calib_batches(vocab, 1, eval_batch, T, seed=3)[0]
                    res = evaluate_lm(model, ids, batch_size=eval_batch)
                else:
                    res = METRICS[name].fn(ScoreContext(model, params, batches, ScoreConfig(), device, 0, False))
                torch.cuda.synchronize()
                row = {"peak_bytes": torch.cuda.max_memory_allocated(), "before_bytes": before,
                       "reserved_peak_bytes": torch.cuda.max_memory_reserved(), "s": time.perf_counter() - t}
                del res
            except torch.OutOfMemoryError as e:  # a finding, not a crash: record it and go on
                row = {"error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
            row["peak_gib"] = row.get("peak_bytes", float("nan")) / 2**30
            out[f"{name}@{T}"] = row
            print(f"memory {name} seq {T}: {row}", file=sys.stderr, flush=True)
    return out


def table(rep: dict) -> str:
    g, t, p, e, c, m = (rep.get(k, {}) for k in ("gradient", "topk", "perturb", "eval", "cache", "memory"))
    g, t, p, e, c, m = ({} if "error" in d else d for d in (g, t, p, e, c, m))
    lines = [f"bench: {rep['model']} on {rep['device']} ({rep['n_eligible'] / 1e6:.1f}M scored weights), "
             f"{rep['calib_tokens']} calibration tokens, torch {rep['torch']}, {rep['threads']} CPU threads",
             f"{'figure':<46}{'value':>12}  target / detail", "-" * 96]

    def row(name, v, detail=""):
        lines.append(f"{name:<46}{v:>12}  {detail}")

    if m:
        row("CUDA weights", f"{m['weights_bytes'] / 2**30:.2f} GiB", m["device_name"])
        for k, r in m.items():
            if isinstance(r, dict):
                row(f"peak {k}", f"{r['peak_gib']:.2f} GiB", r.get("error", f"{r['s']:.2f} s; reserved "
                    f"{r['reserved_peak_bytes'] / 2**30:.2f} GiB"))
    if not g:
        return "\n".join(lines)
    row("grad_x_weight / plain fwd+bwd", f"{g['ratio']:.3f}", f"<= 1.15  ({g['grad_x_weight_s']:.2f} s vs {g['fwd_bwd_s']:.2f} s)")
    if "hutchinson_1probe_ratio" in g:
        row("hutchinson (1 probe) / fwd+bwd", f"{g['hutchinson_1probe_ratio']:.3f}", f"<= 3  ({g['hutchinson_1probe_s']:.2f} s)")
        row("hutchinson marginal probe / fwd+bwd", f"{g['hutchinson_marginal_probe_ratio']:.3f}", "<= 2  (one more probe)")
        row("hutchinson per probe at 2 probes / fwd+bwd", f"{g['hutchinson_per_probe_ratio_at_2']:.3f}", "")
    for k, r in t.items():
        if k.startswith("K="):
            row(f"top-K {k} time merged / naive", f"{r['time_ratio']:.3f}", f"{r['merged_s']:.2f} s vs {r['naive_s']:.2f} s "
                f"over {t['n_weights'] / 1e6:.0f}M scores")
            row(f"top-K {k} peak memory merged / naive", f"{r['mem_ratio']:.4f}",
                f"{r['merged_peak_bytes'] / 2**20:.1f} MiB vs {r['naive_peak_bytes'] / 2**20:.1f} MiB")
    for label, r in p.items():
        if label == "size_ratio_big_over_small":
            continue
        for k in ("K=10", "K=1000", "K=100000"):
            if f"{k}_ms" in r:
                row(f"perturb+restore {k} on {label}", f"{r[f'{k}_ms']:.3f} ms",
                    f"random: {r[f'{k}_tensors_touched']} of {r['n_tensors']} tensors, {r['n_eligible'] / 1e6:.1f}M weights")
            if f"{k}_one_tensor_ms" in r:
                row(f"perturb+restore {k} in one tensor on {label}", f"{r[f'{k}_one_tensor_ms']:.3f} ms", "")
    for k, v in p.get("size_ratio_big_over_small", {}).items():
        row(f"perturb+restore {k[:-3]} time big / small model", f"{v:.2f}", "")
    if not e:
        return "\n".join(lines)
    row("eval tokens/s ours / reference loop", f"{e['ratio']:.3f}", f">= 1  ({e['ours_tokens_per_s']:.0f} vs "
        f"{e['reference_tokens_per_s']:.0f} tok/s, batch {e['batch_size']})")
    row("eval |PPL - reference PPL| / reference", f"{e['ppl_rel_diff']:.2e}", f"PPL {e['ppl']:.4f}")
    if c:
        row("score cache hit / miss time", f"{c['ratio']:.4f}", f"{c['hit_s'] * 1000:.1f} ms vs {c['miss_s']:.2f} s, identical={c['identical']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--topk-tensors", type=int, default=16, help="synthetic score tensors for the top-K figure")
    ap.add_argument("--topk-shape", default="2048x2048")
    ap.add_argument("--json", default=None, help="also write the JSON report here")
    ap.add_argument("--skip-hutchinson", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared "
                    "box 1 thread gives steadier timings")
    ap.add_argument("--random-init", action="store_true", help="--model is a directory with a config.json only: "
                    "build it with random weights directly on --device (time and memory need shapes, not values)")
    ap.add_argument("--parts", default="gradient,topk,perturb,eval,cache",
                    help="comma-separated: gradient, topk, perturb, eval, cache, memory (CUDA only)")
    ap.add_argument("--metrics", default="magnitude,act_mag,act_outlier,grad_x_weight,grad_squared,hutchinson_diag",
                    help="metrics whose peak memory --parts memory measures")
    ap.add_argument("--memory-seq-lens", default="512,1024")
    ap.add_argument("--run-args", default="metric=grad_x_weight seeds=0 select.control_draws=1 plots=none",
                    help="--parts run: options of the timed run (the default config otherwise)")
    ap.add_argument("--run-models", default="smollm2-135m",
                    help="--parts run: models to run, comma-separated; a directory with only a config.json is "
                         "given random weights (saved to a temporary checkpoint with the shipped tokenizer)")
    ap.add_argument("--run-tracking", default="offline", help="--parts run: wandb.mode of the timed run")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    valid = {"gradient", "topk", "perturb", "eval", "cache", "memory", "run"}
    if parts - valid:
        ap.error(f"unknown --parts {','.join(sorted(parts - valid))}; valid: {', '.join(sorted(valid))}")
    if "memory" in parts and not a.device.startswith("cuda"):
        ap.error("--parts memory measures CUDA peaks: it needs --device cuda")
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    if parts == {"run"}:  # the runs load their own models
        rep = {"torch": torch.__version__, "threads": torch.get_num_threads(), "run": {}}
        for m in a.run_models.split(","):
            print(f"run {m} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as d:
                name = m
                if Path(m, "config.json").is_file() and not list(Path(m).glob("*.safetensors")):
                    name = save_random_model(m, "smollm2-135m", Path(d) / "model")
                rep["run"][m] = r = bench_run(name, a.run_args.split(), a.run_tracking)
            print(run_line(m, r), file=sys.stderr, flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps(rep, indent=2))
        print(json.dumps(rep, indent=2))
        return 0
    if a.random_init:
        model, device = random_init_model(a.model, a.device, a.dtype)
    else:
        model, tok, device = load_model(ModelConfig(name=a.model, device=a.device, dtype=a.dtype))
    params = eligible_parameters(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = calib_batches(vocab, a.calib_batches, 1, a.seq_len)
    rep = {"model": a.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "n_eligible": sum(p.numel() for p in params.values()), "calib_tokens": a.calib_batches * a.seq_len,
           "seq_len": a.seq_len, "dtype": str(next(model.parameters()).dtype), "random_init": a.random_init}
    if device.type == "cuda":
        rep["gpu"] = torch.cuda.get_device_name()

    def part(name, fn):
        """Run one part; a failure is recorded in the report (and printed) and the other parts still run."""
        if name not in parts:
            return
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rep[name] = fn()
        except Exception as e:  # noqa: BLE001 (a benchmark reports what broke and measures the rest)
            traceback.print_exc()
            rep[name] = {"error": f"{type(e).__name__}: {e}"}
        if a.json:  # after every part: a run stopped by a time limit keeps what it measured
            Path(a.json).write_text(json.dumps(rep, indent=2))

    def gradient():
        return bench_gradient(model, params, batches, device, a.repeats, hutchinson=not a.skip_hutchinson)

    def topk():
        rows, cols = (int(x) for x in a.topk_shape.lower().split("x"))
        return bench_topk(a.topk_tensors, rows, cols, [1000, 1_000_000], device)

    def perturb():
        small = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).to(device)
        return bench_perturb({a.model: params, "llama-2layer-256": eligible_parameters(small)}, [10, 1000, 100_000],
                             max(5, a.repeats))

    if device.type == "cuda":
        part("memory", lambda: bench_memory(model, params, a.metrics.split(","),
                                            [int(x) for x in a.memory_seq_lens.split(",")], a.eval_batch, device))
    part("gradient", gradient)
    part("eval", lambda: bench_eval(model, calib_batches(vocab, 1, a.eval_windows, a.seq_len, seed=1)[0], a.eval_batch,
                                    device, a.repeats))
    part("topk", topk)
    part("perturb", perturb)
    part("cache", lambda: bench_cache(model, params, batches, device))
    print(json.dumps(rep, indent=2))
    print(table(rep))
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
