"""Writing figures: HTML (plotly.js stored once per directory, so the HTML works offline), Plotly JSON (read
back by tracking for interactive W&B charts) and, through kaleido and a headless Chrome/Chromium, PNG and SVG.
Without a Chrome, PNG/SVG are skipped with a warning and HTML/JSON are still written."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from ..files import atomic_write, atomic_write_text

FORMATS = ("html", "json", "png", "svg")


def _plain(obj):
    """Decode plotly's base64 typed arrays ({"dtype", "bdata"[, "shape"]}) into plain lists."""
    if isinstance(obj, dict):
        if set(obj) >= {"dtype", "bdata"} and set(obj) <= {"dtype", "bdata", "shape"}:
            import base64

            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
            if "shape" in obj:
                shape = [int(x) for x in str(obj["shape"]).split(",")]
                arr = arr.reshape(shape)
            return arr.tolist()
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def figure_json(fig: go.Figure) -> str:
    """Plotly JSON with plain number lists (readable by any plotly.js, e.g. W&B's chart panel)."""
    from plotly.utils import PlotlyJSONEncoder

    return json.dumps(_plain(json.loads(fig.to_json())), cls=PlotlyJSONEncoder)


def chrome_available() -> bool:
    """Whether kaleido can find a Chrome/Chromium for static export (BROWSER_PATH or the usual names)."""
    import os

    env = os.environ.get("BROWSER_PATH")
    if env:
        return os.access(env, os.X_OK)
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:
        return False


def save_figures(figs: dict[str, go.Figure], plot_dir: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write each figure as <name>.html/.json/.png/.svg under plot_dir; return the written paths.

    HTML references one plotly.min.js written next to it (works offline). PNG/SVG go through one kaleido
    call (one browser start for all figures); if no Chrome is found they are skipped with a warning."""
    formats = [f for f in formats if f != "none"]
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown plot format '{f}'; valid: {', '.join(FORMATS)}")
    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in figs.items():
        if "html" in formats:  # every file goes through temp + rename: a killed publish leaves no torn plot
            p = d / f"{name}.html"
            atomic_write(p, lambda tmp, fig=fig: fig.write_html(tmp, include_plotlyjs="directory", full_html=True))
            written.append(p)
        if "json" in formats:
            p = d / f"{name}.json"
            atomic_write_text(p, figure_json(fig))
            written.append(p)
    static = [f for f in formats if f in ("png", "svg")]
    if static and figs:
        if not chrome_available():
            print("superweight: warning: no Chrome/Chromium found for PNG/SVG export (apt-get install chromium, "
                  "or set BROWSER_PATH); wrote HTML/JSON only", file=sys.stderr)
        else:
            import plotly.io as pio

            targets, temps, fig_list = [], [], []
            for name, fig in figs.items():
                for f in static:
                    targets.append(d / f"{name}.{f}")
                    temps.append(d / f".{name}.tmp{os.getpid()}.{f}")  # kaleido picks the format by suffix
                    w = fig.layout.width or (fig.layout.meta or {}).get("static_width") if isinstance(fig.layout.meta, dict) else fig.layout.width
                    fig_list.append(go.Figure(fig).update_layout(width=w) if w else fig)
            try:
                pio.write_images(fig_list, temps, scale=2 if "png" in static else 1)
                for tmp, target in zip(temps, targets):
                    os.replace(tmp, target)
            finally:
                for tmp in temps:
                    tmp.unlink(missing_ok=True)
            written.extend(targets)
    return written
