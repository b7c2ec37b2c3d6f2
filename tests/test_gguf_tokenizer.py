"""The embedded Gemma-3-270M's tokenizer, rebuilt from its GGUF vocabulary (superweight.inputs.gguf_tokenizer): special
ids, one BOS, byte fallback, decode(encode(x)) == x over the whole shipped corpus, fewer than 2 tokens per word."""

import pytest

from superweight.inputs.data import boolq_passages
from superweight.inputs.gguf_tokenizer import tokenizer_from_gguf
from superweight.inputs.models import embedded_gguf


@pytest.fixture(scope="module")
def tok():
    d, name = embedded_gguf("gemma3-270m")  # assembled from the four part packages into the cache, sha256-checked
    return tokenizer_from_gguf(str(d / name))


@pytest.fixture(scope="module")
def docs():
    return boolq_passages().docs


def test_special_ids(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 262144


def test_bos_handling(tok):
    ids = tok("Hello world").input_ids
    assert ids == [2, 9259, 1902]  # <bos> 'Hello' '▁world': one BOS, no EOS, no dummy-prefix space
    assert tok("Hello world", add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    batch = tok(["a", "b c"]).input_ids
    assert all(x[0] == tok.bos_token_id and x.count(tok.bos_token_id) == 1 for x in batch)


def test_pieces(tok):
    ids = tok("  two\n\nx\ttab <b>é 🦙", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["  ", "two"] and "\n\n" in pieces and "\t" in pieces and "<b>" in pieces
    assert ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"] == pieces[-4:]  # byte fallback for a char not in the vocab
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("text", ["", " ", "  leading and trailing  ", "a\n\n\nb\r\nc", "中文 Ελληνικά 🦙🦙", "x<y>z &amp; 3.14159"])
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def enc(tok, docs):
    return tok(docs, add_special_tokens=False).input_ids


def test_round_trip_corpus(tok, docs, enc):
    assert [i for i, (d, ids) in enumerate(zip(docs, enc)) if tok.decode(ids) != d] == []


def test_tokens_per_word(docs, enc):
    ratio = sum(map(len, enc)) / sum(len(d.split()) for d in docs)
    assert 1.0 < ratio < 2.0  # measured 1.339 on BoolQ validation passages
