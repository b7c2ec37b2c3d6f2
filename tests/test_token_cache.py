"""The token-window cache key hashes what the tokenizer does (issue 18 item 9): a tokenizer that differs only
in its pre-tokenizer gets a different key and its own windows, never another tokenizer's cached ones."""

import copy

import torch
from tokenizers import pre_tokenizers

from superweight.config import DataConfig
from superweight.inputs.data import build_windows, tokenize_text, tokenizer_id


def test_a_different_pre_tokenizer_gets_its_own_key_and_windows(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = copy.deepcopy(a)
    b.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="isolated"), b.backend_tokenizer.pre_tokenizer])  # " and" -> " ", "and"
    text = "\n".join(f"line {i}: 123456 and 98765 tokens, 2024-{i:02d}" for i in range(120))
    assert tokenize_text(text, a).tolist() != tokenize_text(text, b).tolist()  # they do tokenize differently
    assert tokenizer_id(a) != tokenizer_id(b)
    assert tokenizer_id(a) == tokenizer_id(copy.deepcopy(a))  # stable per tokenizer
    p = tmp_path / "c.txt"
    p.write_text(text)
    cfg = DataConfig(corpus=str(p), seq_len=16, eval_windows=4, calib_windows=2)
    shared = str(tmp_path / "cache")
    build_windows(cfg, a, cache_dir=shared)  # a's token stream lands in the cache first
    wb = build_windows(cfg, b, cache_dir=shared)
    fresh = build_windows(cfg, b, cache_dir=str(tmp_path / "fresh"))
    assert torch.equal(wb.eval_tokens, fresh.eval_tokens) and wb.fingerprint == fresh.fingerprint
