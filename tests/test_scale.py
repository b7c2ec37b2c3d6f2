"""Scale machinery, each property checked directly, none by timing:

* gradient metrics fold each .grad into its score buffer in a post-accumulate hook and free it: at most one
  scored weight holds a .grad at any moment (a plain backward holds all of them);
* score.dtype=bfloat16 / score.offload give the fp32 scores to bf16 precision / exactly;
* gradient checkpointing is really active in eval mode (layers run twice) and changes no score;
* bitsandbytes 8-bit weights: dequantized magnitudes, one-line errors for what is not meaningful;
* global top-K (pruned, lazily compacted) equals a naive concatenate-and-sort on hard inputs, and its
  extra memory is O(K + one tensor), random-K O(K); perturb + restore allocates O(K);
* the content-addressed score cache: a second identical Experiment recomputes nothing.
"""

import json

import pytest
import torch

from conftest import make_int8_linear, make_tiny_llama
from superweight.arguments import parse_config
from superweight.config import ConfigError, PerturbConfig, RunConfig, ScoreConfig
from superweight.core.evaluation import window_stats
from superweight.run.simulation import MemoryTracker
from superweight.core.metrics import METRICS, ScoreContext, accumulate_gradients
from superweight.core.params import checkpointing_active, eligible_parameters, param_hash, quant_kind, weight_values
from superweight.core.perturbation import perturbed
from superweight.core.ranking import tie_hash
from superweight.core.selections import rank
from superweight.run.validation import check_capabilities


def check_quantized(model, params, metrics, perturbations):
    """The up-front capability check of a run with these metrics and perturbations on `params`."""
    cfg = RunConfig()
    cfg.score.metrics, cfg.perturb.names, cfg.select.topk = list(metrics), list(perturbations), [1]
    check_capabilities(cfg, model, params)


def _ctx(model, cfg=None, n_batches=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (1, T), generator=g) for _ in range(n_batches)]
    return ScoreContext(model, eligible_parameters(model), batches, cfg or ScoreConfig(), torch.device("cpu"), seed, False)


# --- scoring memory -------------------------------------------------------------------------------------


def test_at_most_one_grad_alive_inside_hooks():
    model = make_tiny_llama(layers=3)
    ctx = _ctx(model)
    params = list(ctx.params.values())
    alive = []

    def fold(buf, g):
        alive.append(sum(p.grad is not None for p in params))
        buf.add_(g)

    accumulate_gradients(ctx, fold, "probe")
    assert len(alive) == len(params) * len(ctx.batches)  # every weight folded once per batch
    assert max(alive) == 1
    assert all(p.grad is None for p in model.parameters())
    # the same backward without the hooks keeps every gradient: the check above can fail
    from superweight.core.metrics import grads_only_for, lm_loss

    with grads_only_for(model, ctx.params):
        lm_loss(model, ctx.batches[0]).backward()
        assert sum(p.grad is not None for p in params) == len(params)


def test_hook_scores_equal_plain_gradients():
    model = make_tiny_llama(layers=2, seed=4)
    ctx = _ctx(model, n_batches=3)
    bufs = accumulate_gradients(ctx, lambda b, g: b.add_(g), "sum")
    from superweight.core.metrics import lm_loss

    ref = {n: torch.zeros_like(p) for n, p in ctx.params.items()}
    for ids in ctx.batches:
        gs = torch.autograd.grad(lm_loss(model, ids), list(ctx.params.values()))
        for n, g in zip(ctx.params, gs):
            ref[n] += g
    for n in ref:
        torch.testing.assert_close(bufs[n], ref[n], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared"])
def test_bf16_and_offloaded_score_buffers(metric):
    model = make_tiny_llama(layers=2, seed=2)
    ref = METRICS[metric].fn(_ctx(model))
    bf = METRICS[metric].fn(_ctx(model, ScoreConfig(dtype="bfloat16")))
    off = METRICS[metric].fn(_ctx(model, ScoreConfig(offload=True)))
    for n, r in ref.items():
        assert bf[n].dtype == torch.bfloat16 and r.dtype == torch.float32
        assert off[n].device.type == "cpu" and torch.equal(off[n], r)
        # bf16 accumulation: ~3 significant digits per add, relative to the tensor's scale
        torch.testing.assert_close(bf[n].float(), r, rtol=2e-2, atol=2e-2 * float(r.abs().max()))


def test_gradient_checkpointing_is_active_and_changes_nothing():
    model = make_tiny_llama(layers=2, seed=5)
    ref = METRICS["grad_x_weight"].fn(_ctx(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runs = []
    for layer in model.model.layers:  # count executions of each checkpointed layer body
        ckpt = layer._gradient_checkpointing_func

        def counting(fn, *a, _ckpt=ckpt, **kw):
            def body(*aa, **kk):
                runs.append(1)
                return fn(*aa, **kk)

            return _ckpt(body, *a, **kw)

        layer._gradient_checkpointing_func = counting
    ck = METRICS["grad_x_weight"].fn(_ctx(model))
    assert len(runs) == 2 * 2 * 2  # 2 batches x 2 layers, each run again in backward (recomputed)
    assert not any(m.training for m in model.modules())  # eval mode restored
    for n in ref:
        torch.testing.assert_close(ck[n], ref[n], rtol=1e-5, atol=1e-8)
    runs.clear()
    from superweight.core.metrics import lm_loss

    lm_loss(model, torch.zeros(1, 8, dtype=torch.long))  # plain eval mode: Hugging Face skips checkpointing
    assert runs == []
    with checkpointing_active(model) as n_layers:
        assert n_layers == 2 and model.model.layers[0].training and not model.model.layers[0].mlp.training


# --- quantized weights ----------------------------------------------------------------------------------


def _int8_linear():
    return make_int8_linear(64, 16)


def test_int8_weight_values_dequantize_row_wise():
    ref, lin = _int8_linear()
    w = lin.weight
    assert quant_kind(w) == "int8"
    deq = weight_values(w)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    step = (w.SCB.float() / 127).unsqueeze(1)  # one quantization step per row
    # round-to-nearest on a grid of `step` (bitsandbytes stages the weight in fp16 first: < 1 step in all)
    assert bool(((deq - ref.weight.detach()).abs() <= step).all())
    torch.testing.assert_close(deq, w.detach().float() * step)


def test_quantized_metrics_and_perturbations():
    ref, lin = _int8_linear()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].proj = lin
    params = {"layers.0.proj.weight": lin.weight}
    ctx = ScoreContext(model, params, [], ScoreConfig(), torch.device("cpu"))
    mag = METRICS["magnitude"].fn(ctx)["layers.0.proj.weight"]
    torch.testing.assert_close(mag, weight_values(lin.weight).abs())
    check_quantized(model, params, ["magnitude", "act_mag", "act_outlier"], ["zero", "bit_flip"])
    with pytest.raises(ConfigError, match="metric 'grad_x_weight' needs weight gradients.*valid metrics"):
        check_quantized(model, params, ["grad_x_weight"], ["zero"])
    with pytest.raises(ConfigError, match="perturbation 'gauss_noise'.*valid"):
        check_quantized(model, params, ["magnitude"], ["gauss_noise"])
    with pytest.raises(ConfigError, match="needs weight gradients.*int8"):
        accumulate_gradients(ctx, lambda b, g: None, "grad_x_weight")


def test_4bit_weights_refused():
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(torch.zeros(8, 4, dtype=torch.uint8), requires_grad=False)
    assert quant_kind(p) == "4bit"
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].register_parameter("w", p)
    with pytest.raises(ConfigError, match="4-bit weight .*valid: quantize=8bit or none"):
        check_quantized(model, {"layers.0.w": p}, ["magnitude"], ["zero"])


# --- selection at scale ---------------------------------------------------------------------------------


def _naive(scores: dict, k: int, selection: str, seed: int = 0):
    """Concatenate the candidates' keys and sort: key desc, then the seeded tie hash asc. Candidates: finite
    scores, and > 0 for top_k (NaN and zeros never selected)."""
    keys, us, pid, flat = [], [], [], []
    for i, (name, s) in enumerate(scores.items()):
        x = s.reshape(-1)
        x = x.double() if x.dtype == torch.float64 else x.float().double()
        ok = torch.isfinite(x) & ((x > 0) if selection == "top_k" else torch.ones_like(x, dtype=torch.bool))
        idx = torch.nonzero(ok).squeeze(1)
        keys.append(-x[idx] if selection == "bottom_k" else x[idx])
        us.append(tie_hash(seed, name, idx))
        pid.append(torch.full((idx.numel(),), i))
        flat.append(idx)
    keys, us, pid, flat = torch.cat(keys), torch.cat(us), torch.cat(pid), torch.cat(flat)
    o1 = torch.sort(us, stable=True).indices
    order = o1[torch.sort(keys[o1], descending=True, stable=True).indices][:k]
    return pid[order], flat[order]


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
@pytest.mark.parametrize("k", [1, 7, 300, 2000, 5000])
def test_global_topk_equals_naive_sort(selection, k):
    g = torch.Generator().manual_seed(k)
    scores = {}
    for i in range(9):
        n = int(torch.randint(50, 900, (1,), generator=g))
        s = torch.randint(0, 40, (n,), generator=g).float() / 8  # heavy ties, zeros included
        if i % 3 == 1:
            s = s.bfloat16()
        elif i == 5:
            s = s.double() + 1e-12  # fp64 keys that fp32 cannot represent (above every other top score)
        s[torch.randint(0, n, (3,), generator=g)] = float("nan")
        scores[f"model.layers.{i}.w"] = s.reshape(-1, 1) if i % 2 else s
    for seed in (0, 3):
        r = rank(scores, k, "global", selection, seed=seed)
        p, f = _naive(scores, k, selection, seed)
        assert p.numel() == min(k, r.n_candidates)  # stops at the candidates, never padded
        assert torch.equal(r.pid, p) and torch.equal(r.flat, f)


def _o_k_scores():
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.w": torch.rand(512, 512, generator=g) for i in range(12)}, 512 * 512 * 4


def _selection_peak(scores, selection, k):
    tr = MemoryTracker()
    tr.known(list(scores.values()))
    with tr.track():
        r = rank(scores, k, "global", selection)
    assert len(r) == k
    return tr.peak


def test_topk_memory_is_one_tensor_plus_o_k():
    """Extra memory of global top-K / bottom-K over 12 x 256k scores (12 MiB): one tensor's temporaries
    (at most 3 x its bytes) + O(K); a naive concatenation would take all 12 MiB."""
    scores, one = _o_k_scores()
    for selection, k in (("top_k", 1000), ("top_k", 20000), ("bottom_k", 1000)):
        peak = _selection_peak(scores, selection, k)
        assert peak <= 3 * one + 200 * k, (selection, k, peak / one)


def test_random_k_memory_is_o_k():
    """Random-K over the same 12 MiB of scores holds only O(K); a naive concatenation takes all 12 MiB."""
    scores, one = _o_k_scores()
    peak = _selection_peak(scores, "random_k", 20000)
    assert peak <= 200 * 20000, peak
    tr = MemoryTracker()
    tr.known(list(scores.values()))
    with tr.track():
        torch.cat([s.reshape(-1) for s in scores.values()])
    assert tr.peak >= 12 * one  # what the bounds avoid


def test_perturb_restore_allocates_o_k():
    model = make_tiny_llama(layers=2, hidden=64, seed=1)
    params = eligible_parameters(model)
    scores = {n: torch.zeros(p.shape) for n, p in params.items()}
    before = param_hash(model)
    for k in (10, 1000):
        sel = rank(scores, k, "global", "random_k", seed=3).by_param()
        tr = MemoryTracker()
        tr.known(list(model.parameters()) + [t for t in sel.values()])
        with tr.track():
            with perturbed(params, sel, "gauss_noise", PerturbConfig(scale=0.5), seed=1) as info:
                assert info["n"] == k and info["changed"] > 0
        assert tr.peak <= 64 * k + 4096 * len(sel), (k, tr.peak)
        assert param_hash(model) == before


# --- evaluation and cache -------------------------------------------------------------------------------


def test_window_stats_flags_only_scored_nonfinite():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[1, :2] = -100
    nll, correct, count, bad, per_nll, per_n = window_stats(logits, labels)
    m = labels != -100
    lp = torch.log_softmax(logits.double(), -1)
    tok = -lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = tok[m].sum()
    assert float(nll) == pytest.approx(float(ref), rel=1e-6) and int(count) == int(m.sum())
    assert per_n.tolist() == m.sum(1).tolist()  # per window: scored tokens and their NLL sum
    torch.testing.assert_close(per_nll, (tok * m).sum(1), rtol=1e-6, atol=1e-9)
    assert int(correct) == int(((logits.argmax(-1) == labels) & m).sum()) and not bool(bad)
    logits[1, 0, 3] = float("nan")  # an unscored position
    assert not bool(window_stats(logits, labels)[3])
    logits[2, 4, 0] = float("inf")  # a scored one
    assert bool(window_stats(logits, labels)[3])


def test_second_identical_run_hits_the_score_cache(tiny_model_dir, tmp_path):
    from superweight.commands.run import make_experiment, run_experiment

    corpus = tmp_path / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "quiet", "seven"]
    g = torch.Generator().manual_seed(0)
    corpus.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, 10, (40,), generator=g))
                                for _ in range(60)))

    def run(out, seeds="0", *extra):
        cfg = parse_config([f"model={tiny_model_dir}", "metric=grad_x_weight,magnitude", "topk=1,10", f"seeds={seeds}",
                            *extra,
                            f"data.corpus={corpus}",
                            "data.eval_windows=2", "data.calib_windows=2", "data.seq_len=32", "wandb.mode=disabled",
                            f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / out}", "controls=random_k",
                            "plots=none"])
        run_experiment(make_experiment(cfg, progress=False))
        return json.loads((tmp_path / out / "manifest.json").read_text())

    def find(d, key):
        if isinstance(d, dict):
            if key in d:
                return d[key]
            for v in d.values():
                r = find(v, key)
                if r is not None:
                    return r
        return None

    first, second, third = run("a"), run("b"), run("c", seeds="1")
    assert find(first, "score_cache") == {"hits": 0, "misses": 2}
    assert find(second, "score_cache") == {"hits": 2, "misses": 0}
    assert any(k.startswith("score_") for k in find(first, "times"))  # computing scores is timed
    assert not any(k.startswith("score_") for k in find(second, "times"))  # nothing recomputed
    # compact sets hold the seed's rankings (seeded tie-breaks and draws): another seed recomputes both metrics
    assert find(third, "score_cache") == {"hits": 0, "misses": 2}
    # a compact set serves another perturbation that changes the same weights (run a's zero -> sign_flip) ...
    assert find(run("g", "0", "perturb=sign_flip"), "score_cache") == {"hits": 2, "misses": 0}
    # ... but not one that changes other weights (bit_flip can change exact zeros)
    assert find(run("i", "0", "perturb=bit_flip"), "score_cache") == {"hits": 0, "misses": 2}
    # a full set (read in compact mode too) serves another seed of a metric that ignores it (magnitude), not grad_x_weight
    assert find(run("e", "0", "score.cache=full"), "score_cache") == {"hits": 0, "misses": 2}
    assert find(run("f", "1", "score.cache=full"), "score_cache") == {"hits": 1, "misses": 1}
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()
