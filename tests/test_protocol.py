"""The evaluation protocols against hand-written references, offline.

`paper` (wikitext2/wikitext103/c4): `superweight.inputs.data.hf_split` is replaced by a stand-in split of raw
WikiText-like rows (empty rows and ' = Heading = ' rows kept) and compared with the evaluation loop of the
GPTQ / Wanda / Super Weight code, written out below (`paper_reference`):

    enc = tokenizer("\\n\\n".join(test["text"]), return_tensors="pt").input_ids   # the tokenizer's own BOS
    nsamples = enc.numel() // L
    nll_i = CrossEntropy(logits[:, :-1], batch[:, 1:]) * L      # mean over the L-1 shifted tokens, times L
    ppl = exp(sum_i nll_i / (nsamples * L))                        # = exp(mean_i of the per-window mean CE)

What is compared: the evaluation windows token for token (exact), and the perplexity of
`evaluate_lm` (sum of -log p over every token after a window's first / their count; each window has L-1
scored tokens, so it is the same quantity) with rel. tolerance 1e-5 (fp32 logits, different summation order).
`documents` (text files, boolq, lambada): windows spread over the corpus and disjoint from calibration.
"""

import math
import random

import pytest
import torch

import superweight.inputs.data as data
from superweight.config import DataConfig, RunConfig
from superweight.inputs.data import build_windows
from superweight.core.evaluation import TASKS, encode_pair, evaluate_lm, lambada_scores
from superweight.run.experiment import evaluate_all

L = 64


def assert_one_per_stratum(idx: list[int], n: int, k: int):
    """Evenly spread: exactly one of the k indices in each stratum [j·n/k, (j+1)·n/k) of range(n)."""
    assert len(idx) == k and sorted(idx) == idx
    assert [sum(j * n <= i * k < (j + 1) * n for i in idx) for j in range(k)] == [1] * k


def wikitext_rows(n: int, seed: int, words=("the", "city", "of", "river", "in", "was", "a", "king", "battle", "game")):
    """Raw rows as in wikitext-*-raw-v1: '' separators, ' = Heading = ' and ' = = Sub = = ' rows, paragraphs,
    every non-empty row ending in ' \\n'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = rng.random()
        if r < 0.3:
            rows.append("")
        elif r < 0.4:
            rows.append(f" = {rng.choice(words).title()} {i} = \n")
        elif r < 0.45:
            rows.append(f" = = {rng.choice(words)} = = \n")
        else:
            rows.append(" " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + " . \n")
    return rows


TEST_ROWS = wikitext_rows(300, 0)
TRAIN_ROWS = wikitext_rows(200, 1, words=("horse", "music", "album", "song", "band", "record", "tour"))


@pytest.fixture
def offline_hub(monkeypatch):
    """hf_split -> the stand-in splits; records every call (dataset, config, split, data_files)."""
    calls = []

    def fake(name, config, split, data_files=None, column="text"):
        calls.append((name, config, split, data_files))
        if name == "allenai/c4":
            return [f"document {i} " + " ".join(["web text"] * (3 + i % 5)) for i in range(1500)] if split == "validation" \
                else [f"train doc {i} about cooking" for i in range(400)]
        return TEST_ROWS if split == "test" else TRAIN_ROWS

    monkeypatch.setattr(data, "hf_split", fake)
    return calls


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def bos_adding(tok):
    """The same tokenizer, made to put its BOS in front of every text (as Llama's does)."""
    from tokenizers.processors import TemplateProcessing

    tok = type(tok).from_pretrained(tok.name_or_path)
    b = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{b} $A", pair=f"{b} $A $B",
                                                              special_tokens=[(b, tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def paper_reference(model, tok, text: str, seqlen: int):
    """The papers' loop (GPTQ datautils/llama_eval; Wanda eval_ppl), one window per batch."""
    enc = tok(text, return_tensors="pt").input_ids
    nsamples = enc.numel() // seqlen
    nlls = []
    for i in range(nsamples):
        batch = enc[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            lm_logits = model(batch).logits
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = batch[:, 1:]
        loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen)
    ppl = torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen))
    return enc, nsamples, float(ppl)


@pytest.mark.parametrize("bos", [False, True])
def test_wikitext_paper_protocol_matches_the_papers_loop(offline_hub, tiny, tmp_path, bos, capsys):
    model, tok = tiny
    if bos:
        tok = bos_adding(tok)
    w = build_windows(DataConfig(corpus="wikitext2", seq_len=L, eval_windows=0, calib_windows=2), tok,
                      cache_dir=str(tmp_path))
    enc, nsamples, ref_ppl = paper_reference(model, tok, "\n\n".join(TEST_ROWS), L)
    assert w.protocol == "paper" and w.bos_mode == ("stream" if bos else "never")
    assert nsamples >= 20 and len(w.eval_idx) == nsamples
    assert torch.equal(w.eval_tokens, enc[0, : nsamples * L].view(nsamples, L))
    starts_bos = (w.eval_tokens[:, 0] == tok.bos_token_id).tolist()
    assert starts_bos == [bos] + [False] * (nsamples - 1)  # one BOS, at the start of the whole stream
    ids, labels = w.eval_inputs()
    res = evaluate_lm(model, ids, labels, batch_size=8)
    assert res.tokens == nsamples * (L - 1) and res.window_tokens == [L - 1] * nsamples
    assert res.ppl == pytest.approx(ref_ppl, rel=1e-5)
    # calibration comes from the train split: exactly the train text's windows, never a test window
    train_enc = tok("\n\n".join(TRAIN_ROWS), return_tensors="pt").input_ids[0]
    n_train = train_enc.numel() // L
    assert torch.equal(w.tokens[w.pool_idx], train_enc[: n_train * L].view(n_train, L))
    for seed in (0, 1):
        assert set(w.calib_idx(seed).tolist()) <= set(w.pool_idx.tolist())
        assert not set(w.calib_idx(seed).tolist()) & set(w.eval_idx.tolist())
    assert [c[2] for c in offline_hub] == ["test", "train"] and offline_hub[0][:2] == ("wikitext", "wikitext-2-raw-v1")
    # a number of windows: spread over the split (not its first passages)
    assert capsys.readouterr().err == ""  # every window: the papers' label, no warning
    w8 = build_windows(DataConfig(corpus="wikitext2", seq_len=L, eval_windows=8, calib_windows=2), tok,
                       cache_dir=str(tmp_path))
    assert_one_per_stratum(w8.eval_idx.tolist(), nsamples, 8)
    # a subset of the split is not the papers' perplexity: labelled so, with one warning line
    err = capsys.readouterr().err
    assert w8.protocol == "paper-subset" and err.count("\n") == 1 and f"8 of the {nsamples} windows" in err


def test_gemma_style_bos_in_every_window(offline_hub, tiny, tmp_path):
    model, tok = tiny
    tok = bos_adding(tok)
    w = build_windows(DataConfig(corpus="wikitext2", seq_len=L, eval_windows=0, calib_windows=2), tok,
                      cache_dir=str(tmp_path), bos_every_window=True)
    body = tok("\n\n".join(TEST_ROWS), add_special_tokens=False)["input_ids"]
    n = len(body) // (L - 1)
    ref = torch.cat([torch.full((n, 1), tok.bos_token_id), torch.tensor(body[: n * (L - 1)]).view(n, L - 1)], 1)
    assert w.bos_mode == "window" and torch.equal(w.eval_tokens, ref)
    assert bool((w.tokens[w.pool_idx, 0] == tok.bos_token_id).all())  # calibration windows too


def test_c4_one_validation_shard_first_1100_documents_256_windows(offline_hub, tiny, tmp_path):
    model, tok = tiny
    seq = 16
    w = build_windows(DataConfig(corpus="c4", seq_len=seq, eval_windows=0, calib_windows=2), tok, cache_dir=str(tmp_path))
    val = [f"document {i} " + " ".join(["web text"] * (3 + i % 5)) for i in range(1500)]
    enc = tok(" ".join(val[:1100]), return_tensors="pt").input_ids[0]
    assert enc.numel() // seq > 256  # the cap matters here
    assert torch.equal(w.eval_tokens, enc[: 256 * seq].view(256, seq))
    val_calls = [c for c in offline_hub if c[2] == "validation"]
    assert val_calls == [("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})]
    train_calls = [c for c in offline_hub if c[2] == "train"]
    assert train_calls[0][3] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    w32 = build_windows(DataConfig(corpus="c4", seq_len=seq, eval_windows=32, calib_windows=2), tok, cache_dir=str(tmp_path))
    assert_one_per_stratum(w32.eval_idx.tolist(), 256, 32)
    assert w.protocol == "paper" and w32.protocol == "paper-subset"


def test_documents_protocol_spreads_eval_windows_disjoint_from_calibration(tiny, tmp_path):
    model, tok = tiny
    docs = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(20 + i % 9)) for i in range(150)]
    p = tmp_path / "docs.txt"
    p.write_text("\n".join(docs) + "\n")
    cfg = DataConfig(corpus=str(p), seq_len=32, eval_windows=10, calib_windows=4)
    w = build_windows(cfg, tok, cache_dir=str(tmp_path / "c"))
    # reference: documents joined by EOS (after each), cut into windows
    stream = []
    for d in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += d + [tok.eos_token_id]
    n = len(stream) // 32
    assert w.protocol == "documents" and torch.equal(w.tokens, torch.tensor(stream[: n * 32]).view(n, 32))
    want = w.eval_idx.tolist()
    assert_one_per_stratum(want, n, 10)
    assert sorted(w.pool_idx.tolist() + want) == list(range(n))
    for seed in range(4):
        c = w.calib_idx(seed).tolist()
        assert len(set(c)) == 4 and not set(c) & set(want)
    # a BOS-adding tokenizer: one BOS before the stream, nothing else inserted (this tokenizer's EOS is its
    # BOS id, so a later window may start with an EOS separator); Gemma: [BOS] + L-1 stream tokens per window
    bt = bos_adding(tok)
    ws = build_windows(cfg, bt, cache_dir=str(tmp_path / "c"))
    assert int(ws.tokens[0, 0]) == bt.bos_token_id
    assert torch.equal(ws.tokens.reshape(-1), torch.tensor([bt.bos_token_id] + stream)[: ws.tokens.numel()])
    ww = build_windows(cfg, bt, cache_dir=str(tmp_path / "c"), bos_every_window=True)
    assert bool((ww.tokens[:, 0] == bt.bos_token_id).all())
    assert torch.equal(ww.tokens[:, 1:].reshape(-1), torch.tensor(stream[: ww.tokens.size(0) * 31]))


def test_tasks_get_the_bos_of_the_perplexity_windows(tiny, tmp_path):
    model, tok = tiny
    bt = bos_adding(tok)
    ctx, cont = encode_pair(bt, "The cat sat on the", " mat", bos=bt.bos_token_id)
    plain_ctx, plain_cont = encode_pair(bt, "The cat sat on the", " mat")
    assert ctx == [bt.bos_token_id] + plain_ctx and cont == plain_cont
    assert plain_ctx == tok("The cat sat on the", add_special_tokens=False)["input_ids"]
    # the experiment hands every task the BOS its windows start with (None when they have none)
    seen = []

    @TASKS.register("bos_probe")
    def probe(model, tokenizer, limit, batch_size, bos):
        seen.append(bos)
        return {"x": 0.0}

    try:
        p = tmp_path / "c.txt"
        p.write_text("\n".join(f"line {i} of some text" for i in range(200)))
        cfg = RunConfig()
        cfg.eval.tasks = ["bos_probe"]
        cfg.data = DataConfig(corpus=str(p), seq_len=16, eval_windows=2, calib_windows=1)
        for t, every, want in ((tok, False, None), (bt, False, bt.bos_token_id), (bt, True, bt.bos_token_id)):
            windows = build_windows(cfg.data, t, cache_dir=str(tmp_path / "c"), bos_every_window=every)
            res = evaluate_all(model, t, windows, cfg.eval)
            assert seen[-1] == want and res["bos_probe/x"] == 0.0
    finally:
        TASKS._entries.pop("bos_probe", None)
    # and it reaches the model: LAMBADA's per-token perplexity with the BOS is the one of [BOS] + context +
    # continuation computed by hand (log-softmax of the model's logits at the continuation's positions)
    ex = [{"context": "The cat sat on the", "continuation": " mat and slept"}]
    ids = [bt.bos_token_id] + tok(ex[0]["context"], add_special_tokens=False)["input_ids"]
    cont = tok(ex[0]["continuation"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + cont])).logits[0].double(), -1)
    ll = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(cont))
    got = lambada_scores(model, bt, ex, batch_size=1, bos=bt.bos_token_id)
    assert got["ppl"] == pytest.approx(math.exp(-ll / len(cont)), rel=1e-4)
    assert lambada_scores(model, bt, ex, batch_size=1)["ppl"] != pytest.approx(got["ppl"], rel=1e-4)
