"""The architecture matrix: tiny random-init models of the families users point the tool at first, each built
from a config (no download), saved with the small test tokenizer, and run in process through a full
experiment with every metric, every control and two perturbations, and through the Super Weight detector.

Families: Llama, GPT-2 (Conv1D), OPT, GPT-NeoX (fused qkv), Phi-3 (fused qkv and gate_up), Qwen2 (tied
embeddings), Gemma-2, Gemma-3 (BOS in every window), OLMo-2, Mixtral (fused 3-D experts + router)."""

import json
import math

import pytest
import torch
import transformers as tf

from superweight.arguments import parse_config
from superweight.commands import main
from superweight.commands.run import make_experiment, run_experiment
from superweight.core.metrics import METRICS
from superweight.core.params import eligible_parameters, weight_kind

H, L, V = 16, 2, None  # hidden, layers; vocab = the tokenizer's

FAMILIES = {
    "llama": lambda v: tf.LlamaConfig(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    "gpt2": lambda v: tf.GPT2Config(vocab_size=v, n_embd=H, n_layer=L, n_head=2, n_positions=64),
    "opt": lambda v: tf.OPTConfig(vocab_size=v, hidden_size=H, ffn_dim=32, num_hidden_layers=L, num_attention_heads=2,
                                  max_position_embeddings=64, word_embed_proj_dim=H),
    "gpt_neox": lambda v: tf.GPTNeoXConfig(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                           num_attention_heads=2, max_position_embeddings=64),
    "phi3": lambda v: tf.Phi3Config(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0),
    "qwen2": lambda v: tf.Qwen2Config(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True),
    "gemma2": lambda v: tf.Gemma2Config(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        max_position_embeddings=64),
    "gemma3": lambda v: tf.Gemma3TextConfig(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                            max_position_embeddings=64, sliding_window=8),
    "olmo2": lambda v: tf.Olmo2Config(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    "mixtral": lambda v: tf.MixtralConfig(vocab_size=v, hidden_size=H, intermediate_size=32, num_hidden_layers=L,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                          num_local_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return tf.AutoTokenizer.from_pretrained(tiny_model_dir)


def build(family: str, tok, path, seed: int = 0):
    torch.manual_seed(seed)
    cfg = FAMILIES[family](len(tok))
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # a few exact zeros, as in a quantized checkpoint: controls must skip them
        next(p for n, p in model.named_parameters() if p.ndim >= 2 and ".0." in n).view(-1)[:5] = 0.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def args(model_dir, out, cache, *extra):
    return [f"model={model_dir}", f"out_dir={out}", f"cache_dir={cache}", "model.device=cpu", "wandb.mode=disabled",
            "plots=none", "data.seq_len=16", "data.eval_windows=3", "data.calib_windows=1", "score.probes=1",
            "seeds=0", "topk=1,4", "select.control_draws=1", "data.max_documents=40", *extra]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_full_experiment_and_detector(family, tokenizer, tmp_path, one_thread):
    model = build(family, tokenizer, tmp_path / "model")
    params = eligible_parameters(model)
    kinds = {weight_kind(model, n) for n in params}
    if family == "gpt2":
        assert kinds == {"conv1d"}
    if family == "mixtral":
        assert "experts" in kinds and not any(".gate.weight" in n for n in params), "routers are excluded"
    cfg = parse_config(args(tmp_path / "model", tmp_path / "out", tmp_path / "cache",
                            f"metric={','.join(METRICS)}", "perturb=zero,sign_flip"))
    exp = make_experiment(cfg, progress=False)
    df = run_experiment(exp).table
    n_metrics, ks, sels, perts = len(METRICS), 2, 1 + 3, 2
    assert len(df) == n_metrics * ks * sels * perts
    assert set(df["metric"]) == set(METRICS)
    ok = df[df["selection"] != "top_k"]
    assert (ok["changed"] == ok["n_selected"]).all(), "every control weight is changed (no zeros selected)"
    assert df["nll"].map(math.isfinite).all()
    assert (exp.out / "manifest.json").exists()
    rc = main(["detect", *args(tmp_path / "model", tmp_path / "det", tmp_path / "cache", "candidates=2", "random=1")])
    assert rc == 0
    det = json.loads((tmp_path / "det" / "detect.json").read_text())
    assert det["layers"], "the detector hooks at least one down projection"


def test_8bit_model_end_to_end_after_forwards(tokenizer, tmp_path, one_thread):
    """bitsandbytes 8-bit on the CPU: Linear8bitLt moves its row scales from weight.SCB to state.SCB at the first
    forward; the baseline evaluation runs before scoring, so every metric below reads the weights after forwards.
    Gradient metrics are refused before anything is written (8-bit weights have no weight gradients)."""
    pytest.importorskip("bitsandbytes")
    build("llama", tokenizer, tmp_path / "model")
    base = args(tmp_path / "model", tmp_path / "out", tmp_path / "cache", "quantize=8bit",
                "metric=magnitude,act_mag,act_outlier", "perturb=zero,bit_flip", "perturb.bits=sign")
    exp = make_experiment(parse_config(base), progress=False)
    df = run_experiment(exp).table
    p = next(p for n, p in exp.params.items())
    assert p.dtype == torch.int8 and getattr(p, "SCB", None) is None, "the scales moved to state.SCB"
    assert set(df["metric"]) == {"magnitude", "act_mag", "act_outlier"}
    top = df[(df["selection"] == "top_k") & (df["metric"] == "magnitude") & (df["perturbation"] == "zero")]
    assert (top["changed"] == top["n_selected"]).all() and (top["delta_nll"] != 0).any()
    out = tmp_path / "out2"
    rc = main(["run", *args(tmp_path / "model", out, tmp_path / "cache", "quantize=8bit", "metric=grad_x_weight")])
    assert rc == 2 and not out.exists()
