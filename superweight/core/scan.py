"""One pass over a score set that the later O(N) steps read instead of the scores.

Every score falls in one of 512 classes read from its float bits (no log, exact): its sign bit and its 8
exponent bits, as float32 and bfloat16 store them (float16 is read as float32, exactly).

    code e, 1 <= e <= 254    a positive normal score in the octave 2^(e-127) <= s < 2^(e-126)
    code 0                   +0 or a positive subnormal (0 < s < 2^-126)
    code 255                 +inf or NaN with the sign bit clear
    codes 256 .. 511         the same for a score with the sign bit set (negative scores, -0, -inf, NaN)

Per chunk of `CHUNK` scores of each tensor the scan keeps the 512 counts, the zeros and the positive
subnormals (counted apart only where code 0 or 256 holds something other than zeros); per tensor Σ s and
max s. What reads it:

* the score summary (score_summary.py): the octave histogram of all positive finite scores, n_zero, the
  per-tensor sums and maxima, with no other pass;
* the global ranking by score (modes.py, `ScanPlan`): how many informative scores each tensor holds (the
  support, without a pass), a first floor that at least K informative candidates reach (so a chunk is
  compared once with the floor and only the few entries past it are keyed, hashed and ranked), and which
  chunks hold any entry past the floor (the others are never read);
* the tie counts (overlap.py): which chunks can hold a boundary score at all.

A scan is exact for float32, bfloat16 and float16 scores (`exact`). Other dtypes (float64 or integer scores:
tests, custom metrics) get the counts and histogram of their float32 rounding (sums and maxima stay exact), and
the rankings read their scores in full as before.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

CHUNK = 1 << 20  # scores per chunk: a chunk's temporaries stay in cache; a ranking skips a chunk whole
_BITS = {torch.float32: (torch.int32, 23), torch.bfloat16: (torch.int16, 7)}  # (same-size int, mantissa bits)
MIN_NORMAL = 2.0 ** -126
GRID_BINS = 255  # histogram bins at most: the positive subnormals and the 254 octaves of positive normals
LOG10_2 = math.log10(2.0)


def codes(x: torch.Tensor) -> torch.Tensor:
    """The class code (sign bit << 8 | exponent bits) of each float32 or bfloat16 score, as int32/int16."""
    view, shift = _BITS[x.dtype]
    return (x.view(view) >> shift).bitwise_and_(0x1FF)


def code_of(v: float) -> int:
    """The class code of a value v (module docstring); 0 for 0 and the subnormals, 255 for inf and NaN."""
    a = abs(v)
    if not math.isfinite(a):
        e = 255  # ±inf (and NaN) sit in the top exponent code
    elif a < MIN_NORMAL:
        e = 0
    else:
        e = min(math.frexp(a)[1] + 126, 255)  # a = m 2^x, 1/2 <= m < 1: 2^(x-1) <= a < 2^x, exponent field x+126
    return e | (256 if math.copysign(1.0, v) < 0 else 0)


class Scan:
    """The classes of a score set (module docstring), by chunk: `counts` [chunks, 512], `zeros` and
    `pos_sub` (positive subnormals) [chunks], `chunk_pid`/`chunk_start`/`chunk_len` [chunks]; per tensor `sums` and
    `maxima` (float64, NaN kept), `numel`."""

    def __init__(self, scores: dict[str, torch.Tensor]):
        self.names = list(scores)
        self.exact = all(s.dtype in (*_BITS, torch.float16) for s in scores.values())
        counts, zeros, pos_sub, pid, start, length = [], [], [], [], [], []
        self.sums, self.maxima, self.numel = [], [], []
        for p, name in enumerate(self.names):
            flat = scores[name].detach().reshape(-1)
            self.numel.append(flat.numel())
            total, maxima = 0.0, []
            for st in range(0, flat.numel(), CHUNK):
                raw = flat[st:st + CHUNK]
                x = raw if raw.dtype in _BITS else raw.float()  # float16 exactly; other dtypes rounded
                n_zero = x.numel() - int(torch.count_nonzero(x))
                c = torch.bincount(codes(x), minlength=512).cpu()
                subnormal = int(c[0]) + int(c[256]) - n_zero  # ± subnormals: rare, then counted by sign
                counts.append(c)
                zeros.append(n_zero)
                pos_sub.append(int(((x > 0) & (x < MIN_NORMAL)).sum()) if subnormal else 0)
                pid.append(p)
                start.append(st)
                length.append(x.numel())
                # float32 partial sums of 2^20 scores (pairwise inside torch), added in float64; float64 and
                # integer scores, and a chunk whose float32 sum overflows, summed in float64
                part = float(x.sum(dtype=torch.float32)) if raw.dtype in (*_BITS, torch.float16) else math.nan
                total += part if math.isfinite(part) else float(raw.sum(dtype=torch.float64))
                maxima.append(raw.max().double().cpu())
            self.sums.append(total)
            self.maxima.append(float(torch.stack(maxima).max()) if maxima else float("nan"))
        self.counts = torch.stack(counts) if counts else torch.zeros(0, 512, dtype=torch.int64)
        self.zeros = torch.tensor(zeros, dtype=torch.int64)
        self.pos_sub = torch.tensor(pos_sub, dtype=torch.int64)
        self.chunk_pid = torch.tensor(pid, dtype=torch.int64)
        self.chunk_start = torch.tensor(start, dtype=torch.int64)
        self.chunk_len = torch.tensor(length, dtype=torch.int64)
        self.chunk = CHUNK  # the chunk size it was built with
        self.first, self.n_chunks = {}, {}  # tensor id -> index of its first chunk, its number of chunks
        for i, p in enumerate(pid):
            self.first.setdefault(p, i)
            self.n_chunks[p] = self.n_chunks.get(p, 0) + 1

    # ---- per-tensor counts -------------------------------------------------------------------------------
    def per_tensor(self, per_chunk: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.names), dtype=torch.int64)
        return out.index_add_(0, self.chunk_pid, per_chunk.to(torch.int64))

    def positive(self) -> torch.Tensor:
        """[tensors] how many finite scores > 0 each tensor holds (Top-K's informative scores)."""
        return self.per_tensor(self.counts[:, 1:255].sum(1) + self.pos_sub)

    def finite(self) -> torch.Tensor:
        """[tensors] how many finite scores each tensor holds (Bottom-K's informative scores)."""
        return torch.tensor(self.numel, dtype=torch.int64) - self.per_tensor(self.counts[:, 255] + self.counts[:, 511])

    def first_floor(self, order: str, need: int, excluded: torch.Tensor) -> float | None:
        """A first floor f on the ranking key (key = s for order "desc", informative s finite > 0; key = -s
        for "asc", informative s finite) that at least `need` informative candidates reach: the counts of
        the classes past an octave bound, less the informative scores of the excluded weights (`excluded`,
        float64) past it. None where the scan cannot tell (not exact; "asc" with negative scores)."""
        if not self.exact or (order == "asc" and self.negative_finite()):
            return None
        ex = torch.sort(excluded.double()).values
        if order == "desc":
            ge = self.counts[:, 1:255].sum(0).flip(0).cumsum(0).flip(0)  # ge[e-1]: scores >= 2^(e-127)
            for e in range(254, 0, -1):
                v = 2.0 ** (e - 127)
                if int(ge[e - 1]) - (ex.numel() - int(torch.searchsorted(ex, v))) >= need:
                    return v
            return 0.0  # every positive score
        below = int(self.zeros.sum()) - int(torch.searchsorted(ex, 0.0, right=True))  # s <= 0
        if below >= need:
            return 0.0
        total = int(self.zeros.sum()) + int(self.pos_sub.sum())
        per_e = self.counts[:, 1:255].sum(0)
        for e in range(0, 255):  # bound v = 2^(e-126): zeros, subnormals and octaves 1..e lie below it
            total += int(per_e[e - 1]) if e else 0
            v = 2.0 ** (e - 126)
            if total - int(torch.searchsorted(ex, v)) >= need:
                return -v
        return -math.inf  # every finite score

    def negative_finite(self) -> int:
        """How many finite scores < 0 the set holds (negative normals and negative subnormals)."""
        neg_sub = self.counts[:, 0] + self.counts[:, 256] - self.zeros - self.pos_sub
        return int(self.counts[:, 257:511].sum() + neg_sub.sum())

    # ---- which chunks can hold what -------------------------------------------------------------------------
    def chunks(self, pid: int, start: int, stop: int) -> slice:
        """The chunks of tensor `pid` that overlap its flat range [start, stop)."""
        first, n = self.first.get(pid, 0), self.n_chunks.get(pid, 0)
        return slice(first + min(start // self.chunk, n), first + min(-(-stop // self.chunk), n))

    @cached_property
    def _at_least(self) -> torch.Tensor:
        """[chunks, 256]: scores with sign bit clear and code >= e (so >= 2^(e-127) for e >= 1)."""
        return self.counts[:, :256].flip(1).cumsum(1).flip(1)

    def may_reach(self, pid: int, start: int, stop: int, v: float) -> bool:
        """Whether scores [start, stop) of tensor `pid` can hold a score >= v (v > 0)."""
        return bool(self._at_least[self.chunks(pid, start, stop), code_of(v) & 255].any())

    def may_hold(self, pid: int, start: int, stop: int, values: list[float]) -> bool:
        """Whether scores [start, stop) of tensor `pid` can hold any of `values` (a NaN: any NaN class)."""
        cls = {c for v in values for c in ((255, 511) if math.isnan(v) else (code_of(v),))}
        if any(c & 255 == 0 for c in cls):
            cls |= {0, 256}  # ±0 lies in either sign's code 0
        return bool(self.counts[self.chunks(pid, start, stop)][:, sorted(cls)].any())

    def all_zero(self, pid: int, start: int, stop: int) -> bool:
        """Whether every score in [start, stop) of tensor `pid` is ±0 (every chunk it overlaps is)."""
        sl = self.chunks(pid, start, stop)
        return bool(torch.equal(self.zeros[sl], self.chunk_len[sl]))

    def may_hold_below(self, pid: int, start: int, stop: int, v: float) -> bool:
        """Whether scores [start, stop) of tensor `pid` can hold a score <= v (v >= 0), NaN-signed codes
        and -inf included (the caller found no finite negative score)."""
        c = self.counts[self.chunks(pid, start, stop)]
        return bool(c[:, : (code_of(v) & 255) + 1].any() or c[:, 256:].any())

    # ---- the summary's histogram ---------------------------------------------------------------------------
    def histogram(self) -> dict[str, torch.Tensor]:
        """hist_log10_edges, hist_count, n_zero of every positive finite score: bin 0 of the grid holds the
        positive subnormals [2^-149, 2^-126), bin e (1..254) the octave [2^(e-127), 2^(e-126)); the edges are
        log10 of the bin bounds, trimmed to the non-empty span; zeros are counted in n_zero, negative and
        non-finite scores in neither."""
        grid = self.counts[:, :255].sum(0)
        grid[0] = self.pos_sub.sum()
        nz = torch.nonzero(grid).flatten()
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.numel() else (127, 128)
        e = torch.arange(lo, hi + 1, dtype=torch.float64)
        edges = (e - 127) * LOG10_2
        if lo == 0:
            edges[0] = -149 * LOG10_2
        return {"hist_log10_edges": edges, "hist_count": grid[lo:hi].clone(),
                "n_zero": self.zeros.sum().clone()}


class ScoreSet(dict):
    """A score set (parameter name -> scores) that knows its scan (computed on first use, then shared by
    the summary, every ranking by score and every tie count of the set). Treat the scores as read-only."""

    summary: dict | None = None  # its score summary once made (score_summary.py; run/experiment.py keeps it)

    @cached_property
    def scan(self) -> Scan:
        return Scan(self)


def score_set(scores: dict[str, torch.Tensor]) -> ScoreSet:
    """`scores` as a ScoreSet (itself when it is one: its scan is kept)."""
    return scores if isinstance(scores, ScoreSet) else ScoreSet(scores)
