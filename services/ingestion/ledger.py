"""An append-only ledger of what ingestion dropped or quarantined, by day and reason.

One JSON line per batch with rejections (`<offline>/rejections.jsonl`); `freshrec data report`
sums it. Metrics carry the same counts per process; the ledger survives restarts.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

REJECTIONS_FILE = "rejections.jsonl"


class RejectionLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, at: datetime, rejected: Mapping[str, int]) -> None:
        counts = {reason: int(n) for reason, n in rejected.items() if n}
        if not counts:
            return
        line = json.dumps({"date": at.date().isoformat(), "rejected": counts}, sort_keys=True)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(line + "\n")

    def totals(self) -> dict[str, dict[str, int]]:
        """{date: {reason: count}}, skipping a torn last line."""
        out: dict[str, Counter[str]] = {}
        if not self.path.exists():
            return {}
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            out.setdefault(record["date"], Counter()).update(record["rejected"])
        return {day: dict(counts) for day, counts in sorted(out.items())}
