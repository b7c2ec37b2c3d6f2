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

from .metrics import autocast_ctx
from .models import input_device


@dataclass
class LMResult:
    nll: float
    ppl: float
    acc: float
    tokens: int
    nonfinite: bool

    def as_dict(self) -> dict:
        return {"nll": self.nll, "ppl": self.ppl, "acc": self.acc, "tokens": self.tokens, "nonfinite": self.nonfinite}


def strided_windows(stream: torch.Tensor, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF "perplexity of fixed-length models": windows every `stride` tokens; all but the first window score
    only their last `stride` tokens (the rest is context, label -100). Returns (input_ids, labels)."""
    n = stream.numel()
    starts = list(range(0, max(n - seq_len, 0) + 1, stride))
    ids = torch.stack([stream[s : s + seq_len] for s in starts])
    labels = ids.clone()
    for j in range(1, len(starts)):
        labels[j, : seq_len - stride] = -100
    return ids, labels


@torch.inference_mode()
def evaluate_lm(model, ids: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 8,
                progress: bool = False, desc: str = "eval") -> LMResult:
    """Next-token NLL / PPL / top-1 accuracy of `model` on windows `ids` [n, T] (labels default to ids)."""
    labels = ids if labels is None else labels
    dev = input_device(model)
    nll_sum, correct, count = 0.0, 0, 0
    nonfinite = False
    for s in tqdm(range(0, ids.size(0), batch_size), desc=desc, disable=not progress, leave=False):
        x = ids[s : s + batch_size].to(dev)
        y = labels[s : s + batch_size, 1:].to(dev)
        with autocast_ctx(dev):
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        y = y.to(logits.device)
        mask = y != -100
        lg = logits[mask].float()
        tgt = y[mask]
        if not torch.isfinite(lg).all():
            nonfinite = True
        nll_sum += float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").double())
        correct += int((lg.argmax(-1) == tgt).sum())
        count += int(tgt.numel())
    nll = nll_sum / max(count, 1)
    ppl = math.exp(nll) if nll < 700 else float("inf")
    if math.isnan(nll):
        ppl = float("nan")
    return LMResult(nll, ppl, correct / max(count, 1), count, nonfinite or not math.isfinite(nll))


# --- downstream tasks -------------------------------------------------------------------------------

# name -> fn(model, tokenizer, limit, batch_size) -> {metric: value}
TASKS: dict[str, Callable[..., dict[str, float]]] = {}


def register_task(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn

    return deco
