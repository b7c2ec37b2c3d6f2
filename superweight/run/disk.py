"""The disk a run will use, from its config and the scored tensors' shapes alone (`superweight plan`).

    cache    the score cache entries the run adds (run/cache.py): with score.cache=compact one set per
             (metric, seed) holding its rankings and score summary; with full one fp32 (or bf16) score per
             scored weight per score set (seeds share a set when the metric uses no calibration data).
    out_dir  the result files (outputs.RunOutputs): per-row tables, the rankings and selections, the score
             summaries; plots are a fixed allowance.

Sizes are counted from what each file holds per entry and per row; the per-line widths of the text files
(`ROW_BYTES`, `RANKING_LINE_BYTES`) are typical values, so the out_dir figure is an estimate, the cache
figure close to exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..core.metrics import METRICS
from ..core.scan import GRID_BINS
from ..core.selections import SELECTIONS
from .cache import COMPACT_MAX_ENTRIES, cache_mode
from .experiment import TOP_SAVED
from .rows import candidate_sets

ENTRY_BYTES = 8 + 8 + 4 + 8  # a ranking entry: pid, flat index (int64), score (fp32), group rank (int64)
GROUP_BYTES = 8  # grouped modes: the entry's comparison group (int64)
MATCH_BYTES = 3 * 8  # matched_k: per-entry match statistics (float64)
ROW_BYTES = 900  # results.csv + perturbation_results.json + effects, per row, beside its per-window NLLs
WINDOW_BYTES = 20  # one per-window NLL in perturbation_results.json
RANKING_LINE_BYTES = 130  # one rankings.csv line
PLOT_BYTES = 8 << 20  # plots/ (HTML, PNG, SVG), when plots are on


@dataclass
class DiskPlan:
    cache: int  # bytes the run adds to the score cache
    out_dir: int  # bytes of the result files
    score_sets: int  # cache entries written
    note: str = ""

    def as_dict(self) -> dict:
        return {"cache_bytes": self.cache, "out_dir_bytes": self.out_dir, "score_sets": self.score_sets,
                "note": self.note}


def _entries(mode: str, k: int, shapes: list[tuple[int, ...]]) -> int:
    """Entries of one K-ranking: K overall, K per tensor (per_layer) or K per output neuron (per_row)."""
    if mode == "global":
        return min(k, sum(_numel(s) for s in shapes))
    if mode == "per_layer":
        return sum(min(k, _numel(s)) for s in shapes)
    return sum(min(k, _numel(s) // max(1, s[0])) * s[0] if len(s) >= 2 else min(k, _numel(s)) for s in shapes)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def set_entries(cfg: RunConfig, shapes: list[tuple[int, ...]], n_groups: int) -> tuple[int, int]:
    """(ranking entries, bytes) of one (metric, seed)'s rankings: Top-K and every control draw, per mode and
    candidate set."""
    ks = sorted(set(cfg.select.topk))
    entries = size = 0
    for mode in cfg.select.modes:
        per = ENTRY_BYTES + (0 if mode == "global" else GROUP_BYTES)
        for sel in ["top_k", *cfg.select.controls]:
            spec = SELECTIONS.get(sel)
            draws = cfg.select.control_draws if spec.random else 1
            if spec.needs_top:  # drawn for every K of the grid
                n = sum(_entries(mode, k, shapes) for k in ks)
                b = n * (per + MATCH_BYTES)
            else:
                n = _entries(mode, ks[-1], shapes)
                b = n * per
            entries += draws * n_groups * n
            size += draws * n_groups * b
    return entries, size


def summary_bytes(shapes: list[tuple[int, ...]]) -> int:
    """The score summary: top entries (pid, flat int64, fp32 score), per-tensor sum and max, the histogram."""
    n = sum(_numel(s) for s in shapes)
    return min(TOP_SAVED, n) * (8 + 8 + 4) + len(shapes) * 16 + (2 * GRID_BINS + 2) * 8


def estimate_disk(cfg: RunConfig, shapes: list[tuple[int, ...]]) -> DiskPlan:
    """Disk of the run `cfg` over scored tensors of `shapes`."""
    n_groups = len(candidate_sets(cfg.perturb.names, cfg.perturb))
    mode = cache_mode(cfg.score.cache)
    n_weights = sum(_numel(s) for s in shapes)
    entries, rank_bytes = set_entries(cfg, shapes, n_groups)
    summ = summary_bytes(shapes)
    per_set_header = 4096 + 256 * len(shapes)  # safetensors JSON header (names, offsets, metadata)
    note = ""
    sets = 0
    if mode == "full":
        for m in cfg.score.metrics:
            sets += len(cfg.seeds) if METRICS.get(m).needs_calibration else 1
        cache = sets * (n_weights * (2 if cfg.score.dtype == "bfloat16" else 4) + per_set_header)
    elif mode == "false":
        cache = 0
    else:
        sets = len(cfg.score.metrics) * len(cfg.seeds)
        if entries > COMPACT_MAX_ENTRIES:
            sets, cache = 0, 0
            note = f"compact sets over {COMPACT_MAX_ENTRIES} entries are not stored (score.cache=full keeps scores)"
        else:
            cache = sets * (rank_bytes + summ + per_set_header)
    n_sets = len(cfg.score.metrics) * len(cfg.seeds)
    per_sel = sum(cfg.select.control_draws if SELECTIONS.get(s).random else 1 for s in cfg.select.controls) + 1
    rows = n_sets * len(cfg.select.modes) * per_sel * len(cfg.select.topk) * len(cfg.perturb.names)
    windows = cfg.data.eval_windows if isinstance(cfg.data.eval_windows, int) else 10_000
    lines = 0
    for mode in cfg.select.modes:
        for sel in ["top_k", *cfg.select.controls]:
            spec = SELECTIONS.get(sel)
            ks = sorted(set(cfg.select.topk)) if spec.needs_top else [max(cfg.select.topk)]
            draws = cfg.select.control_draws if spec.random else 1
            lines += draws * n_groups * sum(min(cfg.select.save_top, _entries(mode, k, shapes)) for k in ks)
    out = (rows * (ROW_BYTES + windows * WINDOW_BYTES) + n_sets * lines * RANKING_LINE_BYTES
           + n_sets * entries * 16 + n_sets * summ
           + (PLOT_BYTES if any(p != "none" for p in cfg.plots) else 0))
    return DiskPlan(int(cache), int(out), sets, note)
