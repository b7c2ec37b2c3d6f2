"""Downstream tasks (LAMBADA, HellaSwag): scoring on hand-made examples with a bigram "model" whose
probabilities are known in closed form, against hand computations; batch-size invariance; NaN handling;
the real data files with a tiny model; and the tasks plus the stability summary in a tiny experiment run."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from superweight.arguments import parse_config
from superweight.commands.run import make_experiment, run_experiment
from superweight.core.evaluation import (
    TASKS, encode_pair, hellaswag_scores, lambada_scores, load_hellaswag, load_lambada, score_continuations,
)

ALPHABET = " abcdefghijklmnopqrstuvwxyz.:"


class CharTokenizer:
    """One token per character; id 0 is EOS (also padding)."""

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None

    def __init__(self):
        self.ids = {c: i + 1 for i, c in enumerate(ALPHABET)}

    def __len__(self):
        return len(ALPHABET) + 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.ids[c] for c in t] for t in texts]}


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: p(next | prefix) = softmax(table[previous token])."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


TOK = CharTokenizer()
V = len(TOK)


def tid(c: str) -> int:
    return TOK.ids[c]


def logprob(table: torch.Tensor, prev: str, nxt: str) -> float:
    """log softmax(table[prev])[nxt], by hand in float64 Python math."""
    row = [float(v) for v in table[tid(prev)]]
    m = max(row)
    return row[tid(nxt)] - (m + math.log(sum(math.exp(v - m) for v in row)))


def hand_ll(table, context: str, continuation: str) -> float:
    text = context + continuation
    start = len(context)
    return sum(logprob(table, text[j - 1], text[j]) for j in range(start, len(text)))


def hand_greedy(table, context: str, continuation: str) -> bool:
    text = context + continuation
    return all(int(table[tid(text[j - 1])].argmax()) == tid(text[j]) for j in range(len(context), len(text)))


def random_table(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2


# --- tokenization of requests --------------------------------------------------------------------------


def test_encode_pair_lm_eval_rules():
    ctx, cont = encode_pair(TOK, "ab ", "cd")  # trailing space moves into the continuation
    assert ctx == [tid("a"), tid("b")] and cont == [tid(" "), tid("c"), tid("d")]
    ctx, cont = encode_pair(TOK, "", "ab")  # empty context: EOS as the prefix token
    assert ctx == [0] and cont == [tid("a"), tid("b")]


# --- LAMBADA -------------------------------------------------------------------------------------------------


def test_lambada_known_answers_and_ppl():
    table = torch.zeros(V, V)
    table[tid("b"), tid(" ")] = 4.0  # after 'b' a space is the argmax
    table[tid(" "), tid("x")] = 3.0  # after ' ' comes 'x'
    table[tid("x"), tid("y")] = 2.0  # after 'x' comes 'y'
    model = Bigram(table)
    hit = {"context": "ab", "continuation": " xy"}  # greedy at every token
    miss = {"context": "ab", "continuation": " xz"}  # 'z' is not the argmax after 'x'
    assert hand_greedy(table, "ab", " xy") and not hand_greedy(table, "ab", " xz")
    res = lambada_scores(model, TOK, [hit, miss], batch_size=2)
    assert res["acc"] == 0.5
    # by hand: log p = L - log(e^L + V - 1) for the boosted entry L, -log(e^L + V - 1) for another in that row
    lse = lambda L: math.log(math.exp(L) + V - 1)  # noqa: E731
    ll_hit = (3 - lse(3)) + (2 - lse(2))  # ' '->'x', 'x'->'y'; the first target ' ' after 'b' is added below
    ll_miss = (3 - lse(3)) + (0 - lse(2))
    first = 4 - lse(4)
    ll_hit, ll_miss = ll_hit + first, ll_miss + first
    assert ll_hit == pytest.approx(hand_ll(table, "ab", " xy"), rel=1e-12)
    assert res["ppl"] == pytest.approx(math.exp(-(ll_hit + ll_miss) / 6), rel=1e-6)  # per continuation token
    assert res["ppl_word"] == pytest.approx(math.exp(-(ll_hit + ll_miss) / 2), rel=1e-6)  # per example
    assert lambada_scores(model, TOK, [hit], batch_size=1)["acc"] == 1.0
    assert lambada_scores(model, TOK, [miss], batch_size=1)["acc"] == 0.0


def greedy_chain(table, prev: str, n: int) -> str:
    out = ""
    for _ in range(n):
        prev = ALPHABET[int(table[tid(prev)].argmax()) - 1]
        out += prev
    return out


def random_examples(table, n: int, seed: int) -> list[dict]:
    """Random contexts; continuations either random (' ' + letters) or the greedy chain (every 3rd)."""
    g = torch.Generator().manual_seed(seed)
    letters = ALPHABET[1:27]

    def pick(k):
        return "".join(letters[int(i)] for i in torch.randint(0, 26, (k,), generator=g))

    ex = []
    for j in range(n):
        ctx = pick(int(torch.randint(1, 30, (1,), generator=g)))
        k = int(torch.randint(1, 5, (1,), generator=g))
        cont = greedy_chain(table, ctx[-1], k) if j % 3 == 0 else " " + pick(k)
        ex.append({"context": ctx, "continuation": cont})
    return ex


def test_lambada_random_against_hand_loop():
    table = random_table(1)
    table[:, 0] = -10.0  # EOS is never the argmax, so greedy chains stay in the alphabet
    ex = random_examples(table, 30, seed=2)
    lls = [hand_ll(table, e["context"], e["continuation"]) for e in ex]
    n_tok = sum(len(e["continuation"]) for e in ex)
    greedy = [hand_greedy(table, e["context"], e["continuation"]) for e in ex]
    assert sum(greedy) >= 10  # the greedy chains
    for bs in (1, 3, 8, 64):
        res = lambada_scores(Bigram(table), TOK, ex, batch_size=bs)
        assert res["acc"] == sum(greedy) / len(ex)
        assert res["ppl"] == pytest.approx(math.exp(-sum(lls) / n_tok), rel=1e-6)
        assert res["ppl_word"] == pytest.approx(math.exp(-sum(lls) / len(ex)), rel=1e-6)


def test_score_continuations_batch_size_invariant_and_ordered():
    table = random_table(3)
    ex = random_examples(table, 23, seed=4)
    reqs = [encode_pair(TOK, e["context"], e["continuation"]) for e in ex]
    ref_ll, ref_greedy = score_continuations(Bigram(table), reqs, batch_size=1)
    for e, v in zip(ex, ref_ll):
        assert v == pytest.approx(hand_ll(table, e["context"], e["continuation"]), rel=1e-6)
    for bs in (2, 5, 23, 100):
        ll, greedy = score_continuations(Bigram(table), reqs, batch_size=bs)
        assert ll == ref_ll and greedy == ref_greedy  # a bigram's logits are batch independent: exact


def test_truncation_to_model_context():
    """Inputs longer than the model context keep their last tokens (lm-eval's left truncation)."""
    table = random_table(5)
    model = Bigram(table)
    model.config = SimpleNamespace(max_position_embeddings=4)
    reqs = [encode_pair(TOK, "abcdefghij", " xy")]
    seen = []
    orig = model.forward
    model.forward = lambda input_ids, **kw: (seen.append(input_ids.clone()), orig(input_ids, **kw))[1]
    ll, _ = score_continuations(model, reqs)
    assert seen[0].shape == (1, 4) and seen[0][0].tolist() == [tid(c) for c in "ij x"]
    assert ll[0] == pytest.approx(hand_ll(table, "abcdefghij", " xy"), rel=1e-6)  # bigram: only prev matters


# --- HellaSwag ---------------------------------------------------------------------------------------------


def hellaswag_table() -> torch.Tensor:
    """After the query's last char 'q', then ' ': 'a' is likely, 'c' unlikely; 'a'->'b' is fairly
    unlikely; 'c'->'d' and 'd'->'d' are near certain. So the short ending 'ab' has the larger total
    loglikelihood but the long ending 'cddddddd' the larger loglikelihood per character."""
    t = torch.zeros(V, V)
    t[tid("q"), tid(" ")] = 10.0
    t[tid(" "), tid("a")] = 6.0
    t[tid(" "), tid("c")] = 1.0
    t[tid("a"), tid("b")] = 1.0
    t[tid("c"), tid("d")] = 12.0
    t[tid("d"), tid("d")] = 12.0
    return t


def test_hellaswag_length_normalization_flips_the_answer():
    table = hellaswag_table()
    choices = ["ab", "cddddddd", "zz"]
    lls = [hand_ll(table, "q", " " + c) for c in choices]
    # the premise of the example, by hand: total favours 'ab', per character favours 'cddddddd'
    assert max(range(3), key=lambda i: lls[i]) == 0
    assert max(range(3), key=lambda i: lls[i] / len(choices[i])) == 1
    model = Bigram(table)
    gold0 = hellaswag_scores(model, TOK, [{"query": "q", "choices": choices, "gold": 0}], batch_size=2)
    gold1 = hellaswag_scores(model, TOK, [{"query": "q", "choices": choices, "gold": 1}], batch_size=2)
    assert gold0 == {"acc": 1.0, "acc_norm": 0.0}
    assert gold1 == {"acc": 0.0, "acc_norm": 1.0}
    both = hellaswag_scores(model, TOK, [{"query": "q", "choices": choices, "gold": 0}] * 3
                            + [{"query": "q", "choices": choices, "gold": 2}], batch_size=5)
    assert both == {"acc": 0.75, "acc_norm": 0.0}


def test_hellaswag_random_against_hand_loop():
    table = random_table(6)
    g = torch.Generator().manual_seed(7)
    letters = ALPHABET[1:27]
    items = []
    for _ in range(12):
        q = "".join(letters[int(i)] for i in torch.randint(0, 26, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g))
        choices = ["".join(letters[int(i)] for i in torch.randint(0, 26, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g))
                   for _ in range(4)]
        items.append({"query": q, "choices": choices, "gold": int(torch.randint(0, 4, (1,), generator=g))})
    acc = acc_norm = 0
    for it in items:
        lls = [hand_ll(table, it["query"], " " + c) for c in it["choices"]]
        acc += max(range(4), key=lambda i: lls[i]) == it["gold"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(it["choices"][i])) == it["gold"]
    for bs in (1, 4, 7, 48):
        res = hellaswag_scores(Bigram(table), TOK, items, batch_size=bs)
        assert res == {"acc": acc / 12, "acc_norm": acc_norm / 12}


def test_nonfinite_model_is_recorded_not_raised():
    table = hellaswag_table()
    table[tid(" ")] = float("nan")
    model = Bigram(table)
    lam = lambada_scores(model, TOK, [{"context": "q", "continuation": " ab"}], batch_size=1)
    assert lam["acc"] == 0.0 and math.isnan(lam["ppl"]) and math.isnan(lam["ppl_word"])
    hs = hellaswag_scores(model, TOK, [{"query": "q", "choices": ["ab", "cd"], "gold": 0}], batch_size=1)
    assert hs == {"acc": 0.0, "acc_norm": 0.0}


# --- the real data files ------------------------------------------------------------------------------------


def test_data_files_load():
    lam = load_lambada()
    assert len(lam) == 5153
    assert lam[0]["continuation"] == " signs" and lam[0]["context"].endswith("I don't care about")
    assert all(e["continuation"].startswith(" ") and len(e["continuation"].split()) == 1 for e in lam)
    hs = load_hellaswag()
    assert len(hs) == 10042  # doc_id < 1,000,000 only; the unconditional copies are skipped
    assert all(len(e["choices"]) == 4 and 0 <= e["gold"] < 4 for e in hs)
    assert not any(e["query"] == "Answer:" for e in hs)
    assert hs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He" and hs[0]["gold"] == 3
    assert load_lambada(7) == lam[:7] and load_hellaswag(5) == hs[:5]  # subset = the first `limit`


def test_tasks_on_real_data_with_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = TASKS["lambada"](model, tok, 6, 1)
    b = TASKS["lambada"](model, tok, 6, 4)
    assert set(a) == {"acc", "ppl", "ppl_word"} and 0 <= a["acc"] <= 1 and a["ppl"] > 1
    assert a["acc"] == b["acc"]
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5) and b["ppl_word"] == pytest.approx(a["ppl_word"], rel=1e-5)
    # a random model is near chance: its per-token perplexity is of the order of the vocabulary size
    assert 0.05 * len(tok) < a["ppl"] < 20 * len(tok)
    h1 = TASKS["hellaswag"](model, tok, 4, 1)
    h2 = TASKS["hellaswag"](model, tok, 4, 16)
    assert set(h1) == {"acc", "acc_norm"} and h1 == h2


def tiny_corpus(tmp_path) -> str:
    words = "the of and a to in is was for on that by with as at from his an were are which this be".split()
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g)) for _ in range(60))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    return str(corpus)


def test_experiment_evaluates_tasks_for_baseline_and_every_perturbation(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = parse_config([f"model={tiny_model_dir}", "metric=magnitude", "topk=1,50", "seeds=0", "controls=random_k",
                        "perturb=zero", "tasks=lambada,hellaswag", "eval.task_limit=3", f"data.corpus={tiny_corpus(tmp_path)}",
                        "data.seq_len=16", "data.eval_windows=2", "data.calib_windows=2", "wandb.mode=disabled", "plots=none",
                        f"out_dir={out}"])
    exp = make_experiment(cfg, progress=False)
    df = run_experiment(exp).table
    assert len(df) == (1 + 2) * 2  # (top_k + 2 random_k draws) x K
    for col in ("lambada/acc", "lambada/ppl", "lambada/ppl_word", "hellaswag/acc", "hellaswag/acc_norm"):
        assert col in exp.baseline and df[col].notna().all(), col
        assert (df[f"delta_{col}"] == df[col] - exp.baseline[col]).all()
    # the baseline task numbers are those of the unperturbed model
    assert exp.baseline["lambada/ppl"] == pytest.approx(TASKS["lambada"](exp.model, exp.tok, 3, 8)["ppl"], rel=1e-6)
    # zeroing the 50 largest weights of a tiny model moves the LAMBADA perplexity
    top50 = df[(df["selection"] == "top_k") & (df["k"] == 50)].iloc[0]
    assert top50["lambada/ppl"] != exp.baseline["lambada/ppl"]


def test_stability_summary_on_a_tiny_run(tiny_model_dir, tmp_path):
    """The stability summary equals a groupby of stability.csv recomputed here, and stability.csv equals
    Jaccard of the Top-K sets in rankings.csv."""
    out = tmp_path / "run"
    cfg = parse_config([f"model={tiny_model_dir}", "metric=magnitude,grad_x_weight", "topk=1,5,20", "seeds=0,1,2",
                        "controls=random_k", "perturb=zero", f"data.corpus={tiny_corpus(tmp_path)}", "data.seq_len=16",
                        "data.eval_windows=2", "data.calib_windows=2", "select.save_top=20", "wandb.mode=disabled", "plots=none",
                        f"out_dir={out}"])
    run_experiment(make_experiment(cfg, progress=False))
    stab = pd.read_csv(out / "stability.csv")
    summ = pd.read_csv(out / "stability_summary.csv")
    rk = pd.read_csv(out / "rankings.csv")
    assert set(rk["selection"]) == {"top_k", "random_k"}
    rk = rk[rk["selection"] == "top_k"]  # stability compares the Top-K sets
    topk = {}
    for (m, s), grp in rk.groupby(["metric", "seed"]):
        grp = grp.sort_values("rank")
        topk[(m, s)] = list(zip(grp["param"], grp["flat_index"]))
    assert len(stab) == 3 * (3 * 2 + 3)  # per K: 3 seed pairs x 2 metrics + 1 metric pair x 3 seeds
    for r in stab.itertuples():
        A = set(topk[(r.metric_a, r.seed_a)][: r.k])
        B = set(topk[(r.metric_b, r.seed_b)][: r.k])
        assert r.jaccard == pytest.approx(len(A & B) / len(A | B))
    seed_rows = summ[summ["kind"] == "seed"]
    assert set(seed_rows["metric"]) == {"magnitude", "grad_x_weight"}
    assert len(summ) == 3 * 3 and set(seed_rows["k"]) == {1, 5, 20}
    for r in summ.itertuples():
        pairs = stab[(stab["kind"] == r.kind) & (stab["mode"] == r.mode) & (stab["k"] == r.k)
                     & (stab["metric_a"] == r.metric_a) & (stab["metric_b"] == r.metric_b)]["jaccard"].tolist()
        assert r.n_pairs == len(pairs) == 3  # seed pairs (0,1), (0,2), (1,2); or seeds 0, 1, 2 for the metric pair
        assert r.mean_jaccard == pytest.approx(sum(pairs) / len(pairs))
        assert r.min_jaccard == min(pairs) and r.max_jaccard == max(pairs)
    # magnitude ignores the calibration data: identical Top-K for every seed
    assert (seed_rows[seed_rows["metric"] == "magnitude"]["min_jaccard"] == 1.0).all()
    assert (summ[summ["kind"] == "metric"]["metric"] == "magnitude vs grad_x_weight").all()
