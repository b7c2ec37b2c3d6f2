"""Cutting a token stream into windows: non-overlapping seq_len windows (with the BOS rule), evenly spread
evaluation indices, strided (sliding) evaluation windows, and the protocol label a window set earns.
"""

from __future__ import annotations

import sys

import torch

from ..config import DataConfig


def strided_windows(stream: torch.Tensor, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF "perplexity of fixed-length models": windows of `seq_len` starting every `stride` tokens; the
    first window scores all its tokens, every later one only its last `stride` (the rest is context,
    label -100); if the stream's end is not reached, a last window ending at the stream's end scores just
    the tokens not yet scored. So every stream token but the first is scored exactly once, each with up to
    seq_len - stride tokens of context (seq_len - 1 in the first window). Returns (input_ids, labels)."""
    n = stream.numel()
    starts = list(range(0, max(n - seq_len, 0) + 1, stride))
    ids = torch.stack([stream[s : s + seq_len] for s in starts])
    labels = ids.clone()
    for j in range(1, len(starts)):
        labels[j, : seq_len - stride] = -100
    tail = n - (starts[-1] + seq_len)
    if tail > 0:
        last = stream[n - seq_len :].clone()
        lab = last.clone()
        lab[: seq_len - tail] = -100
        ids = torch.cat([ids, last[None]])
        labels = torch.cat([labels, lab[None]])
    return ids, labels


def cut(stream: torch.Tensor, seq_len: int, bos: int | None, bos_mode: str) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of a stream: `stream` mode puts one BOS before the whole stream,
    `window` mode [BOS] + (seq_len - 1) tokens per window, `never` nothing."""
    if bos_mode == "window":
        n = stream.numel() // (seq_len - 1)
        body = stream[: n * (seq_len - 1)].view(n, seq_len - 1)
        return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), body], dim=1)
    if bos_mode == "stream":
        stream = torch.cat([torch.tensor([bos], dtype=torch.int64), stream])
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def spread(n: int, k: int) -> torch.Tensor:
    """k window indices evenly spread over range(n) (k <= n): floor((i + 0.5) · n / k)."""
    return torch.tensor(sorted({int((i + 0.5) * n / k) for i in range(k)}), dtype=torch.int64)


def paper_label(cfg: DataConfig, n_eval: int, n_split: int) -> str:
    """`paper` when every window of the split is evaluated at seq_len without a stride (the papers' perplexity),
    else `paper-subset`, with one warning line saying why."""
    if cfg.stride is None and n_eval == n_split:
        return "paper"
    why = (f"data.stride={cfg.stride} slides over the windows" if cfg.stride is not None else
           f"data.eval_windows={cfg.eval_windows} evaluates {n_eval} of the {n_split} windows of the split")
    print(f"superweight: warning: {why}: the perplexity is of a subset (protocol 'paper-subset'), not comparable "
          f"with the papers' (use data.eval_windows=all)", file=sys.stderr)
    return "paper-subset"
