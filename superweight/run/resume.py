"""The resume log: `out_dir/.progress.jsonl`, one line per finished result row.

Line 1 holds the config hash of the run that wrote it (which includes the code version); a rerun with the
same hash reuses every finished row, any other hash starts a fresh log. Each row is appended and fsynced
as it finishes, so a killed run loses at most the row in flight (a torn last line is dropped on read).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ..files import append_jsonl, kill_point, read_jsonl

PROGRESS_FILE = ".progress.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResumeLog:
    def __init__(self, out_dir: str | Path, config_hash: str, resume: bool = True):
        self.path = Path(out_dir) / PROGRESS_FILE
        self.config_hash = config_hash
        entries = read_jsonl(self.path, repair=True) if resume else []
        if not entries or entries[0].get("config_hash") != config_hash:
            if self.path.exists():
                self.path.unlink()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.path, {"config_hash": config_hash, "created": now()})
            self.done: dict[tuple, dict] = {}
        else:
            self.done = {tuple(e["key"]): e["value"] for e in entries[1:] if "key" in e}

    def get(self, key: tuple) -> dict | None:
        return self.done.get(tuple(key))

    def record(self, key: tuple, value: dict) -> dict:
        append_jsonl(self.path, {"key": list(key), "value": value})
        self.done[tuple(key)] = value
        kill_point("row")
        return value

    def __len__(self) -> int:
        return len(self.done)
