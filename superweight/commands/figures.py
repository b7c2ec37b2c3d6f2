"""`superweight figures SOURCE...`: paper figures from several runs (see superweight.edge.figures)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import parse_command
from ..config import ConfigError
from ..edge.figures import build, resolve_sources
from ..edge.plots import FORMATS, VALUES
from .base import register


@dataclass
class FiguresOptions:
    """superweight figures' options."""

    sources: list[str] = field(default_factory=list)  # out_dirs, sweep dirs, offline W&B run dirs, or wandb:ENTITY/PROJECT[/GROUP]
    out: str | None = None  # output directory (default: <sweep dir>/figures for one sweep dir, else ./figures)
    k: int | None = None  # K of the stability heatmaps and the score threshold (default: the largest K of the runs; a metric ranking fewer weights is shown at its support)
    formats: list[str] = field(default_factory=lambda: ["html", "png", "svg", "pdf"])  # html | png | svg | pdf | json
    values: list[str] = field(default_factory=lambda: list(VALUES))  # delta_ppl | delta_nll | delta_acc | ppl_ratio
    sweep: str | None = None  # only the runs of this W&B sweep: ENTITY/PROJECT/ID as `wandb sweep` prints it (no wandb: source needed), or the bare ID with wandb:ENTITY/PROJECT


@register("figures", usage="usage: superweight figures SOURCE... [--out DIR] [--k K] [--formats html,png,svg,pdf] "
                           "[--values delta_ppl,...] [--sweep ENTITY/PROJECT/ID]", options=FiguresOptions, run_config=False)
def main(argv: list[str]) -> int:
    """Pools the runs of every SOURCE; runs that differ in more than metric, perturbation and seeds are
    variants with their own figures. Writes the figures, metric_comparison.csv, summary.csv, gaps.csv and runs.csv."""
    o, _ = parse_command(list(argv), FiguresOptions, positional="sources")
    if not o.sources and o.sweep and "/" in o.sweep:
        o.sources = ["wandb:"]  # the project comes from --sweep ENTITY/PROJECT/ID
    if not o.sources:
        raise ConfigError("no source given; usage: superweight figures OUT_DIR_OR_SWEEP_DIR... [--out DIR]")
    if o.k is not None and o.k <= 0:
        raise ConfigError(f"option '--k' must be > 0, got {o.k}")
    for name, items, valid in (("format", o.formats, FORMATS), ("value", o.values, tuple(VALUES))):
        for x in items:
            if x not in valid:
                raise ConfigError(f"unknown {name} '{x}'; valid choices: {', '.join(valid)}")
    with tempfile.TemporaryDirectory(prefix="superweight-figures-") as tmp:
        dirs = resolve_sources(o.sources, Path(tmp), o.sweep)
        first = Path(o.sources[0])
        default_out = (first / "figures" if len(o.sources) == 1 and not o.sources[0].startswith("wandb:")
                       and first.is_dir() and not (first / "results.csv").exists() else Path("figures"))
        out = Path(o.out) if o.out else default_out
        res = build(dirs, out, o.k, o.formats, o.values)
    print(f"{len(dirs)} runs, {res['runs']['variant'].nunique()} variant(s) -> {len(res['figures'])} figures in {out.resolve()}")
    for name in res["figures"]:
        print(f"  {name}")
    return 0
