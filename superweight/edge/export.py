"""Writing figures: HTML for the screen (plotly.js stored once per directory, so the HTML works offline),
Plotly JSON (read back by tracking for interactive W&B charts) and, for papers, PDF, SVG and PNG through kaleido
and a headless Chrome/Chromium, all from the same figure object at its print size (style.print_size: PDF/SVG
at that size in inches, PNG at 300 dpi). Without a Chrome the static formats are skipped with a warning that
says how to get one, and HTML/JSON are still written."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import get_args

import numpy as np
import plotly.graph_objects as go

from ..config import PlotFormat
from ..files import atomic_write, atomic_write_text

from .style import PNG_DPI, PX_PER_IN

FORMATS = tuple(f for f in get_args(PlotFormat) if f != "none")  # the files a figure can be written as
STATIC = ("png", "svg", "pdf")
NO_CHROME = ("no Chrome/Chromium found for {formats} export; wrote HTML/JSON only. Get one: `uv run kaleido_get_chrome` "
             "(kaleido downloads Chrome for Testing where it looks for it; from Python: `import kaleido; "
             "kaleido.get_chrome_sync()`), or `apt-get install chromium` on Debian/Ubuntu, or point BROWSER_PATH at "
             "an installed Chrome")


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
    """Whether kaleido can find a Chrome/Chromium for static export (BROWSER_PATH, the usual names on PATH, or
    the Chrome for Testing that `kaleido_get_chrome` downloads)."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return os.access(env, os.X_OK)
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:
        return False


def _one_tab_kaleido():
    """kaleido's Kaleido with a tab that renders image after image, or None where this kaleido has no such
    internal (then kaleido's own path). kaleido 1.x reloads its tab after every image, which reloads
    plotly.js (4.6 MB) each time: about 0.35 s an image on 2 cores, 15.5 s for the default run's 30 images,
    5.1 s without. The PNGs are byte-identical; SVG and PDF differ only in plotly's random clip-path ids and
    the PDF's date, as two runs of kaleido's own path do. One browser, one tab, for one call only."""
    try:
        from kaleido import Kaleido
    except ImportError:
        return None
    if not hasattr(Kaleido, "_return_kaleido_tab"):
        return None

    class OneTab(Kaleido):
        async def _return_kaleido_tab(self, tab) -> None:
            await self.tabs_ready.put(tab)

    return OneTab


# A bound on static export: kaleido and Chrome are known to hang for good on some machines (kaleido's issue
# tracker has reports for every major version), and a run that hangs in its figures never writes its
# manifest nor publishes to W&B, and holds its sweep agent. The default run's 30 images take about 5 s on
# 2 cores, and a Chrome start about 2 s: the bound is an order of magnitude above both.
STATIC_TIMEOUT_S = 120.0
STATIC_TIMEOUT_PER_IMAGE_S = 5.0


class StaticExportTimeout(TimeoutError):
    """Static export (kaleido + Chrome) did not finish within its bound; the browser was told to stop."""


class Browser:
    """A kaleido browser started ahead of its images: `Browser()` launches Chrome in a thread of its own
    (about 2 s) while the caller builds the figures; `render(specs)` writes them there and closes it,
    raising what failed (StaticExportTimeout past STATIC_TIMEOUT_S + STATIC_TIMEOUT_PER_IMAGE_S per image);
    `close()` closes it unused. The run's sink starts one before its result files."""

    def __init__(self):
        import threading

        self._specs: Future = Future()
        self._done: Future = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._main, name="superweight-kaleido", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            one_tab = _one_tab_kaleido()
            if one_tab is None:  # no such kaleido internal: kaleido's own path, in this daemon thread
                specs = self._specs.result()  # (not an executor thread, which interpreter exit would wait for)
                if specs:
                    _write_images(specs)
            else:
                asyncio.run(self._run(one_tab))
            self._done.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to render()
            self._done.set_exception(e)

    async def _run(self, one_tab) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        if self._aborted:  # stopped before this loop existed: _abort found no task to cancel
            return
        await self._serve(one_tab)

    def _abort(self, wait_s: float = 10.0) -> None:
        """Stop a browser that overran its bound: cancel its task (kaleido's context exit closes Chrome) and
        wait `wait_s` for the thread. One stuck past that stays behind as a daemon thread."""
        self._aborted = True
        if not self._specs.done():
            self._specs.set_result([])
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop has closed: the thread is ending on its own
                pass
        self._thread.join(wait_s)

    async def _serve(self, one_tab) -> None:
        import plotly.io as pio

        kopts = {k: v for k, v in (("plotlyjs", pio.defaults.plotlyjs), ("mathjax", pio.defaults.mathjax),
                                   ("headers", getattr(pio.defaults, "headers", None))) if v}
        async with one_tab(**kopts) as k:
            specs = await asyncio.to_thread(self._specs.result)
            if specs:
                await k.write_fig_from_object(specs, cancel_on_error=True)

    def render(self, specs: list[dict], timeout_s: float | None = None) -> None:
        """Write kaleido figure specs ({"fig": dict, "path", "opts": {format, width, height, scale}}); any
        image that fails raises; past `timeout_s` (default: the bound for this many images) the browser is
        stopped and StaticExportTimeout raised."""
        from concurrent.futures import wait

        if timeout_s is None:
            timeout_s = STATIC_TIMEOUT_S + STATIC_TIMEOUT_PER_IMAGE_S * len(specs)
        self._specs.set_result(specs)
        if not wait([self._done], timeout=timeout_s).done:  # (a TimeoutError from kaleido itself is not ours)
            self._abort()
            raise StaticExportTimeout(f"static export of {len(specs)} images did not finish in {timeout_s:.0f} s "
                                      "(kaleido/Chrome hung); Chrome was told to stop")
        self._done.result()

    def close(self) -> None:
        if self._aborted:  # stopped already, and waited for
            return
        if not self._specs.done():
            self._specs.set_result([])
        self._thread.join(STATIC_TIMEOUT_S)
        if self._thread.is_alive():  # a Chrome that will not even close: stop waiting for it
            self._abort()


def _write_images(specs: list[dict]) -> None:
    import plotly.io as pio

    pio.write_images([s["fig"] for s in specs], [s["path"] for s in specs],
                     format=[s["opts"]["format"] for s in specs], scale=[s["opts"]["scale"] for s in specs],
                     width=[s["opts"]["width"] for s in specs], height=[s["opts"]["height"] for s in specs])


def write_static(specs: list[dict], browser: Browser | None = None) -> None:
    """Write kaleido figure specs with one browser start for all of them (`browser`: one already started);
    any image that fails raises."""
    b = browser or Browser()
    try:
        b.render(specs)
    finally:
        b.close()


def save_figures(figs: dict[str, go.Figure], plot_dir: str | Path, formats: Iterable[str] = FORMATS,
                 browser: Browser | None = None) -> list[Path]:
    """Write each figure as <name>.html/.json/.png/.svg/.pdf under plot_dir; return the written paths.

    HTML references one plotly.min.js written next to it (works offline). PNG/SVG/PDF go through one kaleido
    call (one browser start for all figures) at the figure's layout size; if no Chrome is found they are
    skipped with a warning (NO_CHROME) naming the ways to get one, and if kaleido/Chrome hangs past its bound
    (STATIC_TIMEOUT_S + STATIC_TIMEOUT_PER_IMAGE_S per image) they are skipped with a warning too: the
    HTML/JSON are returned and the temp images' folder is removed."""
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
            atomic_write(p, lambda tmp, fig=fig: fig.write_html(tmp, include_plotlyjs="directory", full_html=True,
                                                                config={"displaylogo": False}))
            written.append(p)
        if "json" in formats:
            p = d / f"{name}.json"
            atomic_write_text(p, figure_json(fig))
            written.append(p)
    static = [f for f in formats if f in STATIC]
    if static and figs:
        if browser is None and not chrome_available():  # (a browser given has found its Chrome)
            print(f"superweight: warning: {NO_CHROME.format(formats='/'.join(f.upper() for f in static))}",
                  file=sys.stderr)
        else:
            import plotly.io as pio

            topo = {"topojson": pio.defaults.topojson} if pio.defaults.topojson else {}  # as plotly passes it
            # temp images in a private folder, removed as a whole: a browser stopped past its bound that
            # still writes one finds no folder, and leaves no file
            tmpdir = Path(tempfile.mkdtemp(dir=d, prefix=".static-"))
            specs = []
            for name, fig in figs.items():
                spec = fig.to_dict()  # once per figure, shared by its formats
                for f in static:
                    target, tmp = d / f"{name}.{f}", tmpdir / f"{name}.{f}"
                    specs.append((target, tmp, dict(fig=spec, path=tmp, opts=dict(
                        format=f, width=fig.layout.width or 700, height=fig.layout.height or 500,
                        scale=PNG_DPI / PX_PER_IN if f == "png" else 1), **topo)))
            try:
                write_static([s for _, _, s in specs], browser)
                for target, tmp, _ in specs:
                    os.replace(tmp, target)
                written.extend(t for t, _, _ in specs)
            except StaticExportTimeout as e:  # HTML/JSON are written: keep them, and say what is missing
                print(f"superweight: warning: {e}; no {'/'.join(f.upper() for f in static)} written",
                      file=sys.stderr)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
    return written
