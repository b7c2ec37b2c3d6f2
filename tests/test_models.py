"""Model loading (embedded default, local dir, GGUF), parameter eligibility, fingerprints."""

import subprocess
import sys

import pytest
import torch

from superweight.config import ConfigError, ModelConfig
from superweight.inputs.models import embedded_gguf, load_model
from superweight.core.params import (eligible_parameters, fingerprint, layer_of, module_type, param_hash,
                                unique_named_parameters)
from superweight.resources import cache_root


def embedded_cache_dir(name: str = "smollm2-135m"):
    """Where load_model keeps the converted safetensors checkpoint of an embedded model (<cache>/models/<name>)."""
    return cache_root() / "models" / name


def test_tied_parameters_counted_once(tiny_llama):
    names = [n for n, _ in unique_named_parameters(tiny_llama)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    total = sum(p.numel() for _, p in unique_named_parameters(tiny_llama))
    assert total == sum(p.numel() for p in tiny_llama.parameters())  # torch also dedupes tied params


def test_default_eligible_are_block_matrices(tiny_llama):
    el = eligible_parameters(tiny_llama)
    assert len(el) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(p.ndim == 2 and layer_of(n) >= 0 for n, p in el.items())
    with_emb = eligible_parameters(tiny_llama, include=r"embed_tokens|layers\.0\.mlp")
    assert set(with_emb) == {"model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight",
                             "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    assert "model.layers.0.mlp.up_proj.weight" not in eligible_parameters(tiny_llama, exclude="up_proj")
    with pytest.raises(ConfigError, match="no eligible parameters"):
        eligible_parameters(tiny_llama, include="nothing_matches_this")


def test_layer_and_module_names():
    assert layer_of("model.layers.17.mlp.down_proj.weight") == 17
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("model.embed_tokens.weight") == -1
    assert module_type("model.layers.17.mlp.down_proj.weight") == "mlp.down_proj"


def test_fingerprint_and_hash_see_a_single_changed_weight(tiny_llama):
    f0, h0 = fingerprint(tiny_llama), param_hash(tiny_llama)
    w = tiny_llama.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = w[3, 5].item()
        w[3, 5] = old + 1.0
    assert fingerprint(tiny_llama) != f0 and param_hash(tiny_llama) != h0
    with torch.no_grad():
        w[3, 5] = old
    assert fingerprint(tiny_llama) == f0 and param_hash(tiny_llama) == h0


def test_local_dir_loads_on_cpu(tiny_model_dir):
    model, tok, dev = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    assert dev.type == "cpu" and next(model.parameters()).dtype == torch.float32
    assert not model.training and tok.pad_token_id is not None


def test_unknown_model_offline_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_model(ModelConfig(name="no-such-org/no-such-model-xyz", device="cpu"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "missing.gguf"), device="cpu"))


def test_quantize_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    # 4-bit needs CUDA; 8-bit bitsandbytes also runs on the CPU (tests/test_scale.py)
    with pytest.raises(ConfigError, match="quantize=4bit needs a CUDA GPU.*valid on CPU: none, 8bit"):
        load_model(ModelConfig(name="smollm2-135m", device="cpu", quantize="4bit"))


@pytest.mark.slow
def test_embedded_default_is_cached_and_matches_the_gguf(smollm):
    """The safetensors cache of the embedded model gives the same logits as loading the shipped GGUF."""
    model, tok, _ = smollm
    d = embedded_cache_dir()
    assert (d / "config.json").exists() and list(d.glob("*.safetensors"))
    assert sum(p.numel() for _, p in unique_named_parameters(model)) == 134_515_008  # tied lm_head once
    assert len(eligible_parameters(model)) == 30 * 7
    gdir, fname = embedded_gguf("smollm2-135m")
    gguf_model, _, _ = load_model(ModelConfig(name=str(gdir / fname), device="cpu"))
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.inference_mode():
        a = model(ids).logits
        b = gguf_model(ids).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_cached_embedded_model_loads_in_a_fresh_process_without_reconverting(smollm):
    """A fresh process loads the cached checkpoint (no timing assertion: the machine is shared): the same
    weights, byte for byte, as this session's model, and the cache files are read, never rewritten."""
    model, _, _ = smollm
    d = embedded_cache_dir()
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert "config.json" in before and any(n.endswith(".safetensors") for n in before)
    code = ("from superweight.config import ModelConfig;"
            "from superweight.inputs.models import load_model;from superweight.core.params import fingerprint;"
            "m,_,_=load_model(ModelConfig(device='cpu'));print(fingerprint(m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fp = out.stdout.strip().splitlines()[-1]
    assert fp == fingerprint(model)
    assert not [p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}-")]  # no conversion started
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
