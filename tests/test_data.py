"""Corpora, text files and the calibration/evaluation split."""

import pytest
import torch

from superweight.config import ConfigError, DataConfig
from superweight.inputs.data import CORPORA, build_windows, load_documents, read_text_file


class CharTokenizer:
    """A tokenizer stand-in: one token per character (enough to test windowing without a real vocab)."""

    eos_token_id = 0

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[1 + (ord(c) % 250) for c in d] for d in docs]}

    def __len__(self):
        return 251

    def get_vocab(self):
        return {chr(i): i for i in range(1, 251)}


def test_text_file_formats(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\nsecond doc\n\n")
    assert read_text_file(str(p), "lines") == ["first doc", "second doc"]
    assert read_text_file(str(p), "plain") == ["first doc\nsecond doc\n\n"]
    p.write_text("para one\nstill one\n\npara two\n")
    assert read_text_file(str(p), "auto") == ["para one\nstill one\n\npara two\n"]


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), (b"", "is empty"), (b"  \n\n", "is empty"), (b"\x00\x01\x02bin", "looks binary"),
    (b"\xff\xfe\xfa text", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, needle):
    p = tmp_path / "f.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        read_text_file(str(p))


def test_split_is_disjoint_and_seeds_choose_calibration(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n".join(f"document number {i} with some text" for i in range(200)))
    cfg = DataConfig(corpus=str(p), seq_len=16, eval_windows=10, calib_windows=5)
    w = build_windows(cfg, CharTokenizer(), cache_dir=str(tmp_path / "cache"))
    assert w.tokens.shape[1] == 16 and w.eval_tokens.shape == (10, 16)
    ev = set(w.eval_idx.tolist())
    # evaluation windows are spread evenly over the corpus, not its first windows
    n = w.tokens.shape[0]
    gaps = [b - a for a, b in zip(sorted(ev), sorted(ev)[1:])]
    assert min(ev) < n / 10 and max(ev) > n * 0.9 and max(gaps) - min(gaps) <= 1
    assert sorted(set(w.pool_idx.tolist()) | ev) == list(range(n))
    for seed in range(5):
        c = w.calib_idx(seed).tolist()
        assert len(c) == 5 and len(set(c)) == 5 and not ev & set(c)
    # the token stream is cached: a second build reads it back identically
    w2 = build_windows(cfg, CharTokenizer(), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(w.tokens, w2.tokens) and w.fingerprint == w2.fingerprint
    # a seed's calibration windows depend on the seed only, not on torch's global random state
    torch.manual_seed(1)
    a = w.calib_idx(0).tolist()
    torch.manual_seed(2)
    torch.rand(7)
    assert w2.calib_idx(0).tolist() == a
    # and over many seeds every pool window is drawn about equally often (uniform without replacement:
    # count ~ Binomial(seeds, 5 / pool), each within 5 standard deviations of its mean)
    pool, seeds = len(w.pool_idx), 400
    counts = torch.bincount(torch.cat([w.calib_idx(s) for s in range(seeds)]), minlength=n)[w.pool_idx].double()
    q = 5 / pool
    assert float((counts - seeds * q).abs().max()) < 5 * (seeds * q * (1 - q)) ** 0.5
    assert len({tuple(w.calib_idx(s).tolist()) for s in range(seeds)}) > seeds * 0.95
    with pytest.raises(ConfigError, match="above the model context"):
        build_windows(cfg, CharTokenizer(), cache_dir=str(tmp_path / "cache"), context=8)
    with pytest.raises(ConfigError, match="windows"):
        build_windows(DataConfig(corpus=str(p), seq_len=4096, eval_windows=10, calib_windows=5), CharTokenizer(),
                      cache_dir=str(tmp_path / "cache"))


def test_shipped_corpora_load_offline():
    docs = CORPORA["boolq"]().docs
    assert 2500 < len(docs) < 3300 and len(set(docs)) == len(docs)
    assert sum(len(d.split()) for d in docs) > 200_000
    lam = CORPORA["lambada"]().docs
    assert len(lam) == 5153
    assert load_documents(DataConfig(max_documents=7)) == docs[:7]


def test_tokenizer_key_ignores_padding_state(small_tokenizer):
    """A padded batch call sets the backend's padding state; the token-window cache key (what the tokenizer
    does) must not change with it, or an identical second run misses every cache (found by test_scale)."""
    import copy

    from superweight.inputs.data import tokenizer_id

    tok = copy.deepcopy(small_tokenizer)
    before = tokenizer_id(tok)
    tok(["a b c", "d"], padding=True)
    assert tokenizer_id(tok) == before
