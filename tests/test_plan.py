"""`superweight plan`: the simulated peak memory (fake tensors, no weights) against the peak really measured.

Measurement: one fresh subprocess builds each real model (random weights, fp32, CPU, one thread) and runs
the real code (metric functions, evaluate_lm); before each run it resets the kernel's peak-RSS counter
(/proc/self/clear_refs "5") and reads VmRSS, afterwards VmHWM: the difference is what the run allocated.
MALLOC_MMAP_THRESHOLD_ makes every tensor above 8 KiB its own mapping, returned on free (not reused from a heap
torch's live bytes. Measured total = weight bytes + that difference; the plan's estimate must be within 15%.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from superweight.config import ConfigError, RunConfig
from superweight.commands.plan import main
from superweight.run.plan import estimate, parse_size
from superweight.run.simulation import MemoryTracker
from superweight.core.metrics import METRICS
from superweight.inputs.models import build_fake_model

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

MEASURE = r'''
import gc, json, sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, LlamaConfig
from superweight.config import ScoreConfig
from superweight.core.evaluation import evaluate_lm
from superweight.core.metrics import METRICS, ScoreContext
from superweight.core.params import eligible_parameters

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

results = []
for spec in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**spec["config"]), dtype=torch.float32).eval()
    if spec.get("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = eligible_parameters(model)
    scfg = ScoreConfig(**spec.get("score", {}))

    def run(what, T, b):
        ids = torch.randint(0, spec["config"]["vocab_size"], (b, T))
        if what == "evaluation":
            return evaluate_lm(model, ids, batch_size=b)
        return METRICS[what].fn(ScoreContext(model, params, [ids], scfg, torch.device("cpu"), 0, False))

    out = {}
    for what in spec["what"]:
        b = spec["eval_batch"] if what == "evaluation" else spec["batch"]
        r = run(what, 8, b)  # warm-up: kernels, thread pools, lazily built tables
        del r
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        r = run(what, spec["seq_len"], b)
        out[what] = status("VmHWM") - base
        del r
        gc.collect()
    results.append(out)
    del model, params
    gc.collect()
print(json.dumps(results))
'''

BASE = dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
SPECS = [
    dict(config={**BASE, "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "vocab_size": 6144,
                 "tie_word_embeddings": False},
         seq_len=192, batch=2, eval_batch=4, what=["grad_x_weight", "magnitude", "act_mag", "act_outlier", "evaluation"]),
    dict(config={**BASE, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3, "vocab_size": 3072},
         seq_len=256, batch=2, eval_batch=2, score={"probes": 1}, what=["grad_x_weight", "hutchinson_diag", "evaluation"]),
    # gradient checkpointing, bf16 score buffers
    dict(config={**BASE, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 3, "vocab_size": 2048},
         seq_len=256, batch=2, eval_batch=4, ckpt=True, score={"dtype": "bfloat16"}, what=["grad_squared", "evaluation"]),
]


def _available(spec):
    return {**spec, "what": [w for w in spec["what"] if w == "evaluation" or w in METRICS]}


@pytest.fixture(scope="module")
def measuring():
    """Start the measuring subprocess; the test simulates the plans while it runs."""
    specs = [_available(s) for s in SPECS]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="8192", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, json.dumps(specs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    yield specs, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _plan(spec):
    from transformers import LlamaConfig

    cfg = RunConfig()
    cfg.model.device, cfg.model.dtype = "cpu", "float32"
    cfg.model.gradient_checkpointing = bool(spec.get("ckpt"))
    cfg.data.seq_len, cfg.score.batch_size, cfg.eval.batch_size = spec["seq_len"], spec["batch"], spec["eval_batch"]
    for k, v in spec.get("score", {}).items():
        setattr(cfg.score, k, v)
    fm, model = build_fake_model(LlamaConfig(**spec["config"]), torch.float32)
    return estimate(cfg, [w for w in spec["what"] if w != "evaluation"], None, model=model, fake_mode=fm)


@pytest.mark.slow  # builds and runs three real-size models in a fresh interpreter (a clean peak-RSS counter)
def test_estimate_within_15_percent_of_measured_peak(measuring):
    specs, proc = measuring
    plans = [_plan(spec) for spec in specs]
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    report, checked = [], 0
    for spec, meas, plan in zip(specs, results, plans):
        rows = {r.what: r for r in plan.rows}
        for what, extra in meas.items():
            r = rows[what]
            total = r.weights + extra
            err = (r.peak - total) / total
            report.append(f"{spec['config']['hidden_size']}x{spec['config']['num_hidden_layers']} {what}: "
                          f"est {r.peak / MiB:.1f} MiB (run {r.run / MiB:.1f}) measured {total / MiB:.1f} MiB "
                          f"(run {extra / MiB:.1f}) err {100 * err:+.1f}% [{r.method}]")
            checked += 1
        for what, extra in meas.items():
            r = rows[what]
            assert abs(r.peak - (r.weights + extra)) <= 0.15 * (r.weights + extra), "\n".join(report)
    print("\n".join(report))
    assert checked >= 7


def test_plan_weights_are_exact_and_buffers_counted():
    """Weights = parameter + buffer bytes (tied once); a gradient metric's run includes one fp32 buffer per
    scored weight (half of that with score.dtype=bfloat16), beside the activations."""
    spec = _available(SPECS[0])
    plan = _plan({**spec, "what": ["magnitude", "grad_x_weight"]})
    from transformers import AutoModelForCausalLM, LlamaConfig

    real = AutoModelForCausalLM.from_config(LlamaConfig(**spec["config"]), dtype=torch.float32)
    wbytes = sum(t.numel() * t.element_size() for t in list(real.parameters()) + list(real.buffers()))
    rows = {r.what: r for r in plan.rows}
    assert rows["grad_x_weight"].weights == wbytes
    scored = plan.n_eligible * 4
    assert rows["magnitude"].run >= scored  # the score tensors themselves
    assert rows["grad_x_weight"].run > scored
    bf = _plan({**spec, "what": ["grad_x_weight"], "score": {"dtype": "bfloat16"}})
    assert rows["grad_x_weight"].run - bf.rows[0].run >= 0.45 * scored


def test_tracker_counts_live_storages_once():
    t = MemoryTracker()
    keep = torch.zeros(1000)
    t.known([keep])
    with t.track():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        v = a[10:]  # a view: no new storage
        keep.add_(1)  # in place on a known storage: not counted
        b = torch.empty(1 << 19, dtype=torch.uint8)
        del a
        assert t.live == (1 << 20) + (1 << 19)  # the view keeps a's storage
        del v
        c = torch.empty(1 << 18, dtype=torch.uint8)
    assert t.peak == (1 << 20) + (1 << 19)
    assert t.live == (1 << 19) + (1 << 18)
    del b, c


def test_cli_table_json_and_fit(capsys, tiny_model_dir):
    assert main([f"model={tiny_model_dir}", "seq_len=64", "batch=2", "metric=magnitude,grad_x_weight", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["what"] for r in d["rows"]] == ["magnitude", "grad_x_weight", "evaluation"]
    assert d["device"] == "cuda" and all(r["fits"] for r in d["rows"])
    assert main([f"model={tiny_model_dir}", "seq_len=64", "metric=grad_x_weight", "gpu_mem=1MB"]) == 0
    out = capsys.readouterr().out
    assert "grad_x_weight" in out and "NO" in out and "evaluation" in out


def test_8b_llama_config_plan():
    """Llama-3.1-8B's shapes (no weights): bf16 weights 16.06 GB; gradient metrics fit 80 GB at seq 2048."""
    from transformers import LlamaConfig

    c = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    tie_word_embeddings=False)
    cfg = RunConfig()
    cfg.model.device, cfg.model.dtype = "cuda", "bfloat16"
    cfg.data.seq_len, cfg.score.batch_size, cfg.eval.batch_size = 2048, 1, 8
    fm, model = build_fake_model(c, torch.bfloat16)
    plan = estimate(cfg, ["grad_x_weight"], parse_size("80GB"), model=model, fake_mode=fm)
    rows = {r.what: r for r in plan.rows}
    assert abs(rows["grad_x_weight"].weights - 16_060_522_496) < 1e6
    scored = plan.n_eligible * 4
    assert 6.9e9 < plan.n_eligible < 7.0e9
    assert rows["grad_x_weight"].run > scored
    assert plan.fits(rows["grad_x_weight"]) and plan.fits(rows["evaluation"])


def test_bad_input():
    with pytest.raises(ConfigError, match="gpu_mem"):
        parse_size("eighty")
    assert parse_size("80GB") == 80 << 30 and parse_size("24576MB") == 24 << 30 and parse_size("141") == 141 << 30
    with pytest.raises(ConfigError, match="unknown metric"):
        main(["metric=nope"])


def test_offloaded_score_buffers_are_host_memory():
    """score.offload=true: every score buffer is counted on the host, none on the device."""
    from transformers import LlamaConfig

    spec = SPECS[0]
    runs = {}
    for off in (False, True):
        cfg = RunConfig()
        cfg.model.device, cfg.model.dtype = "cuda", "bfloat16"
        cfg.data.seq_len, cfg.score.batch_size = 64, 1
        cfg.score.offload = off
        fm, model = build_fake_model(LlamaConfig(**spec["config"]), torch.bfloat16)
        plan = estimate(cfg, ["grad_squared"], parse_size("80GB"), model=model, fake_mode=fm)
        runs[off] = plan.rows[0]
        scored = plan.n_eligible * 4
    assert runs[False].host == 0
    assert runs[True].host == scored
    assert runs[False].run - runs[True].run >= 0.9 * scored
