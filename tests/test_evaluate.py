"""evaluate_lm against an independent plain loop (one window at a time, log_softmax, gather, float64 sums),
batch-size invariance, strided windows (every token scored once, the first window fully) and the
calibration / evaluation split (disjoint windows of one token stream)."""

import math

import pytest
import torch

from superweight.config import DataConfig
from superweight.inputs.data import build_windows, spread, strided_windows, tokenize_stream
from superweight.core.evaluation import evaluate_lm


def reference_loop(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, int]:
    """Plain loop: per window, logits -> log_softmax -> gather the next token; float64 sums."""
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(ids.size(0)):
            logits = model(input_ids=ids[i : i + 1]).logits[0]  # [T, V]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for t in range(ids.size(1) - 1):
                y = int(labels[i, t + 1])
                if y == -100:
                    continue
                nll -= float(logp[t, y])
                correct += int(int(torch.argmax(logits[t])) == y)
                count += 1
    mean = nll / count
    return mean, math.exp(mean), correct / count, count


@pytest.fixture(scope="module")
def model_and_windows():
    from conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=96, hidden=32, layers=2, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (9, 24), generator=g)
    return model, ids


def test_matches_plain_loop(model_and_windows):
    model, ids = model_and_windows
    res = evaluate_lm(model, ids, batch_size=4)
    nll, ppl, acc, count = reference_loop(model, ids, ids)
    assert res.tokens == count == 9 * 23
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(ppl, rel=1e-5)
    assert res.acc == acc  # argmax over the same logits: exact
    assert res.nonfinite is False
    # per-window sums (for paired confidence intervals): each window against the plain loop on its own
    assert res.window_tokens == [23] * 9
    assert math.fsum(res.window_nll) / sum(res.window_tokens) == pytest.approx(res.nll, rel=1e-12)
    for i in range(ids.size(0)):
        w_nll, _, _, w_count = reference_loop(model, ids[i : i + 1], ids[i : i + 1])
        assert res.window_nll[i] == pytest.approx(w_nll * w_count, rel=1e-5)


def test_batch_size_does_not_change_numbers(model_and_windows):
    model, ids = model_and_windows
    stream = ids[:4].reshape(-1)
    sids, slabels = strided_windows(stream, 24, 10)
    for x, y in ((ids, ids), (sids, slabels)):
        results = [evaluate_lm(model, x, y, batch_size=bs) for bs in (1, 3, 8)]
        for r in results[1:]:
            assert r.tokens == results[0].tokens
            assert r.nll == pytest.approx(results[0].nll, rel=1e-5)
            assert r.ppl == pytest.approx(results[0].ppl, rel=1e-5)
            assert r.acc == results[0].acc


def test_masked_labels_match_plain_loop(model_and_windows):
    model, ids = model_and_windows
    sids, slabels = strided_windows(ids[:4].reshape(-1), 24, 10)  # 96 tokens: starts 0..70, then a tail
    assert sids.size(0) == 9
    res = evaluate_lm(model, sids, slabels, batch_size=3)
    nll, ppl, acc, count = reference_loop(model, sids, slabels)
    assert res.tokens == count
    assert res.nll == pytest.approx(nll, rel=1e-5) and res.acc == acc


@pytest.mark.parametrize("n,seq_len,stride", [(216, 24, 10), (216, 24, 12), (100, 16, 5), (64, 16, 15), (50, 8, 1),
                                              (40, 16, 16 - 1), (30, 16, 7)])
def test_strided_windows_score_each_token_once(n, seq_len, stride):
    stream = torch.arange(1000, 1000 + n)  # token value = its stream position + 1000
    ids, labels = strided_windows(stream, seq_len, stride)
    assert ids.shape[1] == seq_len
    scored = labels[:, 1:][labels[:, 1:] != -100] - 1000  # what evaluate_lm scores: labels[:, 1:]
    assert sorted(scored.tolist()) == list(range(1, n))  # every token but the first, exactly once
    # each window is a contiguous slice of the stream, and labels are the window's own tokens
    for w, lab in zip(ids, labels):
        start = int(w[0]) - 1000
        assert torch.equal(w, stream[start : start + seq_len])
        m = lab != -100
        assert torch.equal(lab[m], w[m])
    # the first window is scored fully; later ones keep at least seq_len - stride tokens of context
    assert bool((labels[0] != -100).all())
    for lab in labels[1:]:
        assert int((lab == -100).sum()) >= seq_len - stride


def test_strided_perplexity_with_full_stride_context(model_and_windows):
    """With stride 1 every window after the first scores only its last token, from seq_len - 1 tokens of
    context: checked against one forward per token."""
    model, ids = model_and_windows
    stream = ids.reshape(-1)[:30]
    sids, slabels = strided_windows(stream, 12, 1)
    res = evaluate_lm(model, sids, slabels, batch_size=16)
    assert res.tokens == 29
    nll = 0.0
    with torch.no_grad():
        # token t (t >= 12) predicted from the 11 tokens before it; tokens 1..11 from the first window
        first = torch.log_softmax(model(input_ids=stream[None, :12]).logits[0].double(), -1)
        nll -= sum(float(first[t - 1, stream[t]]) for t in range(1, 12))
        for t in range(12, 30):
            lp = torch.log_softmax(model(input_ids=stream[None, t - 11 : t + 1]).logits[0, -2].double(), -1)
            nll -= float(lp[stream[t]])
    assert res.nll == pytest.approx(nll / 29, rel=1e-5)


def test_calibration_and_evaluation_windows_disjoint(tmp_path, small_tokenizer):
    tok = small_tokenizer
    lines = [f"Document {i} talks about topic {i * 7 % 13} and number {i * i}." for i in range(80)]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines))
    cfg = DataConfig(corpus=str(path), seq_len=16, eval_windows=5, calib_windows=4)
    w = build_windows(cfg, tok, cache_dir=str(tmp_path / "cache"))
    stream = tokenize_stream(lines, tok)
    n = stream.numel() // 16
    assert w.tokens.shape == (n, 16)
    assert torch.equal(w.tokens.reshape(-1), stream[: n * 16])  # windows = consecutive slices of the stream
    ev = set(w.eval_idx.tolist())
    assert ev == set(spread(n, 5).tolist())  # spread evenly over the corpus
    assert min(ev) < n / 5 and max(ev) > n * 4 / 5
    assert ev.isdisjoint(w.pool_idx.tolist()) and len(ev) + len(w.pool_idx) == n
    spans_eval = {p for i in ev for p in range(16 * i, 16 * i + 16)}
    for seed in (0, 1, 2):
        cal = w.calib_idx(seed).tolist()
        assert len(cal) == 4 and len(set(cal)) == 4 and not (set(cal) & ev)
        spans_cal = {p for i in cal for p in range(16 * i, 16 * i + 16)}
        assert not (spans_cal & spans_eval)  # no stream position (token) in both
        assert torch.equal(w.calib(seed), w.tokens[cal])
    assert w.calib_idx(0).tolist() != w.calib_idx(1).tolist()
    # strided evaluation slides over the evaluation block only
    ws = build_windows(DataConfig(corpus=str(path), seq_len=16, eval_windows=5, calib_windows=4, stride=8), tok,
                       cache_dir=str(tmp_path / "cache"))
    ids, labels = ws.eval_inputs()
    want_ids, want_labels = strided_windows(stream[: 5 * 16], 16, 8)
    assert torch.equal(ids, want_ids) and torch.equal(labels, want_labels)
    assert int((labels[:, 1:] != -100).sum()) == 5 * 16 - 1
