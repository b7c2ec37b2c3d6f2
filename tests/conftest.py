"""Shared fixtures. Tiny random models build in milliseconds; the real shipped model (SmolLM2-135M) is
converted once into a cache that persists between test runs (.cache/ at the repo root, git-ignored)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("SUPERWEIGHT_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_tiny_llama(vocab_size: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, tie_word_embeddings=kw.pop("tie_word_embeddings", True),
                      attn_implementation=kw.pop("attn_implementation", "eager"), **kw)
    return LlamaForCausalLM(cfg).eval()


def make_int8_linear(n_in: int, n_out: int):
    """(fp32 reference Linear, bitsandbytes Linear8bitLt with the same weights quantized on the CPU: weight is
    Int8Params holding int8 codes, row scales SCB separate). Skips where bitsandbytes cannot do it."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ref = torch.nn.Linear(n_in, n_out, bias=False)
    lin = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
    lin.load_state_dict(ref.state_dict())
    try:
        lin = lin.to("cpu")  # quantizes: weight.data becomes int8
    except Exception as e:  # an older bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {e}")
    if lin.weight.dtype != torch.int8:
        pytest.skip("bitsandbytes did not quantize on CPU")
    return ref, lin


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: as fast for tiny models, and several times faster on a loaded shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer, device) of the real shipped SmolLM2-135M on CPU, loaded once per session."""
    from superweight.config import ModelConfig
    from superweight.inputs.models import load_model

    return load_model(ModelConfig(device="cpu"))


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm):
    """The real SmolLM2 tokenizer (as `load_model` returns it for the embedded default)."""
    return smollm[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer):
    """A local HF model dir: a tiny random Llama with the real SmolLM2 tokenizer (fast CLI end-to-end)."""
    tok = smollm_tokenizer
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=1)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
