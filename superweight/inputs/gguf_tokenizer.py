"""Build a correct fast tokenizer for SentencePiece-BPE GGUF vocabularies (Gemma 3 and similar).

Used for the embedded Gemma-3-270M (models.EMBEDDED). Checked on the shipped BoolQ corpus: decode(encode(x))
== x for every passage, 1.34 tokens per word, and the same token ids as llama.cpp's SPM encoding loop.

transformers' own GGUF conversion for gemma2/gemma3 (`GGUFGemmaConverter`) builds a *Unigram* model whose
log-probabilities are the GGUF `scores`; for Gemma those scores are BPE merge ranks (0, -1, -2, ...), not
log-probabilities, so Unigram prefers many cheap pieces and the text comes out roughly one token per character.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["tokenizer_from_gguf", "read_tokenizer_fields"]

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # '▁', SentencePiece's whitespace marker


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_tokenizer_fields(gguf_path: str) -> dict:
    """Parse only the GGUF header key/values (little-endian GGUF v2/v3) and return the `tokenizer.ggml.*` ones
    (prefix dropped) and `general.architecture` (as `_architecture`).

    A minimal reader: `gguf.GGUFReader` also maps every tensor and takes ~20 s on the 262k-token Gemma vocab.
    """
    import struct

    import numpy as np

    with open(gguf_path, "rb") as fh:
        buf = memoryview(fh.read(64 << 20))  # metadata lives at the start; 64 MiB is ample
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{gguf_path} is not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    pos = 24

    def read_str():
        nonlocal pos
        (ln,) = struct.unpack_from("<Q", buf, pos)
        s = bytes(buf[pos + 8 : pos + 8 + ln]).decode("utf-8", errors="replace")
        pos += 8 + ln
        return s

    def read_value(vtype):
        nonlocal pos
        if vtype == 8:
            return read_str()
        if vtype == 9:
            (itype, count) = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if itype in _NP:
                arr = np.frombuffer(buf, dtype=_NP[itype], count=count, offset=pos)
                pos += arr.nbytes
                return arr.tolist()
            return [read_value(itype) for _ in range(count)]
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    out = {}
    for _ in range(n_kv):
        key = read_str()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        value = read_value(vtype)
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml.") :]] = value
        elif key == "general.architecture":
            out["_architecture"] = value
    return out


def tokenizer_from_gguf(gguf_path: str):
    """Return a `transformers.PreTrainedTokenizerFast` rebuilt from a GGUF file's own tokenizer metadata.

    Supports `tokenizer.ggml.model == "llama"` (SentencePiece) vocabularies, as used by Gemma 2/3 GGUFs.
    Construction, mirroring what SentencePiece's BPE model and llama.cpp's SPM tokenizer do at encode time:

    * Model: `tokenizers.models.BPE` over the full vocabulary (`tokenizer.ggml.tokens`, ids kept), with
      `byte_fallback=True` (characters outside the vocabulary become `<0xNN>` byte tokens) and `unk_token`.
      If the GGUF has `tokenizer.ggml.merges` they are used as is. Otherwise (Gemma) merges are derived from
      `tokenizer.ggml.scores`: SentencePiece BPE / llama.cpp repeatedly merge the adjacent pair whose
      concatenation is a NORMAL vocabulary piece with the highest score, so every split `(l, r)` of each normal
      piece with both halves in the vocabulary becomes a merge, ranked by the piece's score (best first;
      ties between splits of the same piece by the halves' scores).
    * Normalizer: `Replace(" ", "▁")` only (Gemma: identity normalization, no dummy prefix unless
      `tokenizer.ggml.add_space_prefix` is true, in which case a `Prepend("▁")` is added). No pre-tokenizer:
      SentencePiece BPE does not split on whitespace at encode time.
    * USER_DEFINED pieces (newline / tab / space runs, HTML tags) are atomic in SentencePiece: they are added
      as non-special added tokens matched on the raw text (space runs are stored with literal spaces in GGUF).
      CONTROL pieces (`<pad>`, `<eos>`, `<bos>`, `<unk>`, `<mask>`, `<start_of_turn>`, `<unusedN>`, ...)
      are added as special tokens, so `skip_special_tokens=True` drops them on decode.
    * Decoder: `Replace("▁", " ")`, `ByteFallback()`, `Fuse()` (+ `Strip` of one leading space when a
      dummy prefix is used).
    * Post-processor / wrapper: bos/eos/unk/pad from `tokenizer.ggml.*_token_id`; `add_bos_token` and
      `add_eos_token` from the GGUF (Gemma: BOS only), implemented with a `TemplateProcessing` post-processor.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    f = read_tokenizer_fields(str(Path(gguf_path)))
    if f.get("model") != "llama":
        raise ValueError(f"only SentencePiece ('llama') GGUF vocabularies are supported, got {f.get('model')!r}")
    tokens: list[str] = list(f["tokens"])
    n = len(tokens)
    scores = list(f["scores"]) if "scores" in f else [-float(i) for i in range(n)]
    types = list(f["token_type"]) if "token_type" in f else [_NORMAL] * n
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:
        raise ValueError("GGUF vocabulary has duplicate tokens")

    if f.get("merges"):
        merges = [tuple(m.split(" ", 1)) for m in f["merges"]]
    else:
        # pieces that can appear as BPE symbols: normal pieces (single characters included)
        normal = {t: scores[i] for i, t in enumerate(tokens) if types[i] == _NORMAL}
        ranked = []  # (piece score, left score, right score, left, right)
        for piece, s in normal.items():
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                sl, sr = normal.get(left), normal.get(right)
                if sl is not None and sr is not None:
                    ranked.append((s, sl, sr, left, right))
        ranked.sort(key=lambda x: (-x[0], -x[1], -x[2]))
        merges = [(m[3], m[4]) for m in ranked]

    def tok(key):
        i = f.get(key)
        return tokens[i] if i is not None and 0 <= i < n else None

    bos, eos, unk, pad = tok("bos_token_id"), tok("eos_token_id"), tok("unknown_token_id"), tok("padding_token_id")

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(f.get("add_space_prefix", False))
    norm = [normalizers.Replace(" ", _SPACE)]
    if add_prefix:
        norm.insert(0, normalizers.Prepend(_SPACE))
    backend.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(dec)

    # CONTROL pieces first (special), then USER_DEFINED ones (plain text, atomic)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )

    add_bos = bool(f.get("add_bos_token", bos is not None)) and bos is not None
    add_eos = bool(f.get("add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, vocab[t]) for t in {bos if add_bos else None, eos if add_eos else None} if t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    out = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
    )
    return out
