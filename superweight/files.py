"""Crash-safe file writes: every output is written to a temp file in the same directory and renamed, so a
killed run never leaves a half-written file; progress rows are appended to a JSONL log (a torn last line
is ignored on resume)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

def slug(text: str, n: int = 80, keep: str = "_.=+-") -> str:
    """`text` as a name safe in file names, URLs and W&B artifact names: every run of characters other than
    letters, digits and `keep` becomes "_", trimmed of "_" at both ends, at most `n` characters."""
    return re.sub(rf"[^A-Za-z0-9{re.escape(keep)}]+", "_", str(text)).strip("_")[:n]


_UMASK = os.umask(0)
os.umask(_UMASK)


_KILL_COUNTS: dict[str, int] = {}


def kill_point(name: str, detail: str = "") -> None:
    """Test hook for crash-safety tests, a no-op unless SUPERWEIGHT_TEST_KILL_AT is `<name>`, `<name>:<n>`
    or `<name>:<detail>`: the n-th time (default the 1st) execution reaches kill_point(name), or the first
    time with that detail (e.g. `write:rankings.csv`), the process SIGKILLs itself: no cleanup, no finally
    blocks, as when an agent or the OOM killer kills a run. Points: score, row, write, publish."""
    spec = os.environ.get("SUPERWEIGHT_TEST_KILL_AT")
    if not spec:
        return
    target, _, when = spec.partition(":")
    if target != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    hit = _KILL_COUNTS[name] == int(when or 1) if (when or "1").isdigit() else detail == when
    if hit:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        kill_point("write", path.name)  # tests: die with the complete temp file not yet renamed
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files (`.<name>.*.tmp`) that a run killed inside atomic_write left in `directory`."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def append_jsonl(path: str | Path, obj) -> None:
    """Append one JSON line and fsync. If the file ends in a torn line (a run killed mid-append), end that
    line first, so this record is never glued to the garbage and lost."""
    line = (json.dumps(obj, default=_json_default) + "\n").encode()
    with open(path, "ab+") as f:  # append mode: writes go to the end whatever we read
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """The parseable lines of a JSONL file. A line torn by a kill is skipped; with repair=True the file is
    rewritten (atomically) without it, so the log stays clean for the next reader."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    lines = p.read_text().splitlines()
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # torn line of a killed run
            continue
    if repair and len(out) != len(lines):
        atomic_write_text(p, "".join(json.dumps(o, default=_json_default) + "\n" for o in out))
    return out
