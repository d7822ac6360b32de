"""The served-score log: binning, the flushed line format, and reading it back summed."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from services.common.served_scores import BINS, ServedScoreLog, bin_counts, read_served_scores

# 2024-05-01 23:58 UTC: two minutes before a day boundary.
T0 = datetime(2024, 5, 1, 23, 58, tzinfo=UTC)
MINUTE0 = int(T0.timestamp() // 60)
OWN_FILE = f"{socket.gethostname()}-{os.getpid()}.jsonl"


class FakeClock:
    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _counts(**bins: int) -> list[int]:
    out = [0] * BINS
    for name, n in bins.items():
        out[int(name.removeprefix("b"))] = n
    return out


def test_bins_are_twenty_equal_steps_with_the_ends_clipped() -> None:
    scores = np.array([0.0, 0.049, 0.05, 0.5, 0.999, 1.0, -0.2, 1.5, np.nan], dtype=np.float32)
    counts = bin_counts(scores)
    assert counts.shape == (BINS,) and counts.dtype == np.int64
    assert counts.tolist() == _counts(b0=3, b1=1, b10=1, b19=3)  # NaN dropped
    assert bin_counts(np.zeros(0)).tolist() == [0] * BINS


def test_flush_appends_one_line_per_version_and_minute_delta(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    log = ServedScoreLog(tmp_path, flush_seconds=10, clock=clock)
    log.observe("v0001", np.array([0.1, 0.12, 0.9]))
    log.observe("v0001", np.array([0.9]))
    log.observe("v0002", np.array([0.5]))
    clock.now += 60
    log.observe("v0001", np.array([0.3]))
    log.observe("v0001", np.zeros(0))  # nothing re-ranked: no line
    assert log.flush() == 3
    path = tmp_path / "2024-05-01" / OWN_FILE
    assert _lines(path) == [
        {"version": "v0001", "minute": MINUTE0, "counts": _counts(b2=2, b18=2)},
        {"version": "v0002", "minute": MINUTE0, "counts": _counts(b10=1)},
        {"version": "v0001", "minute": MINUTE0 + 1, "counts": _counts(b6=1)},
    ]
    assert log.flush() == 0  # nothing new
    log.observe("v0001", np.array([0.3]))
    assert log.flush() == 1
    # Deltas, not running totals: the minute's second line holds only what came after.
    assert _lines(path)[-1] == {
        "version": "v0001",
        "minute": MINUTE0 + 1,
        "counts": _counts(b6=1),
    }


def test_minutes_of_the_next_day_go_to_that_days_folder(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    log = ServedScoreLog(tmp_path, flush_seconds=10, clock=clock)
    log.observe("v0001", np.array([0.5]))
    clock.now += 150  # 00:00:30 the next day
    log.observe("v0001", np.array([0.5]))
    log.flush()
    assert [m["minute"] for m in _lines(tmp_path / "2024-05-01" / OWN_FILE)] == [MINUTE0]
    assert [m["minute"] for m in _lines(tmp_path / "2024-05-02" / OWN_FILE)] == [MINUTE0 + 2]


def test_zero_flush_seconds_turns_the_log_off(tmp_path: Path) -> None:
    log = ServedScoreLog(tmp_path / "scores", flush_seconds=0)
    log.start()
    log.observe("v0001", np.array([0.5]))
    log.stop()
    assert log.flush() == 0
    assert not (tmp_path / "scores").exists()


def test_constructor_does_no_io_and_start_stop_flush_in_the_background(tmp_path: Path) -> None:
    log = ServedScoreLog(tmp_path / "scores", flush_seconds=0.05)
    assert not (tmp_path / "scores").exists()
    log.start()
    try:
        log.observe("v0001", np.full(7, 0.42))
        deadline = time.monotonic() + 10
        while not list((tmp_path / "scores").glob("*/*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.02)
        log.observe("v0001", np.full(5, 0.42))
    finally:
        log.stop()  # flushes what the thread has not written yet
    read = read_served_scores(tmp_path / "scores", datetime.now(UTC) - timedelta(hours=1))
    assert sum(int(c.sum()) for _, c in read["v0001"]) == 12
    assert read["v0001"][0][1][8] > 0  # 0.42 -> bin 8


def test_a_failed_write_keeps_the_counts_for_the_next_flush(tmp_path: Path) -> None:
    blocker = tmp_path / "scores"
    blocker.write_text("a file where the directory should be")
    log = ServedScoreLog(blocker, flush_seconds=10, clock=FakeClock(T0))
    log.observe("v0001", np.array([0.5, 0.5]))
    assert log.flush() == 0
    blocker.unlink()
    log.observe("v0001", np.array([0.5]))
    assert log.flush() == 1
    assert _lines(blocker / "2024-05-01" / OWN_FILE)[0]["counts"] == _counts(b10=3)


def test_read_sums_replicas_flushes_and_days(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    log = ServedScoreLog(tmp_path, flush_seconds=10, clock=clock)
    log.observe("v0001", np.array([0.1]))
    log.flush()
    log.observe("v0001", np.array([0.1, 0.95]))  # same minute, second flush
    clock.now += 180  # the next day
    log.observe("v0001", np.array([0.7]))
    log.observe("v0002", np.array([0.2]))
    log.flush()
    other = tmp_path / "2024-05-01" / "replica-b-7.jsonl"  # another replica, same minute
    line = {"version": "v0001", "minute": MINUTE0, "counts": _counts(b2=4)}
    other.write_text(json.dumps(line) + "\n")

    read = read_served_scores(tmp_path, T0)
    assert set(read) == {"v0001", "v0002"}
    minutes = [(m, c.tolist()) for m, c in read["v0001"]]
    assert minutes == [(MINUTE0, _counts(b2=6, b19=1)), (MINUTE0 + 3, _counts(b14=1))]
    assert [(m, c.tolist()) for m, c in read["v0002"]] == [(MINUTE0 + 3, _counts(b4=1))]


def test_read_skips_earlier_days_and_minutes(tmp_path: Path) -> None:
    old_day = tmp_path / "2024-04-30"
    old_day.mkdir()
    # A line in an earlier day's folder is never opened, whatever minute it claims.
    line = {"version": "v0001", "minute": MINUTE0 + 10, "counts": _counts(b0=9)}
    (old_day / "r-1.jsonl").write_text(json.dumps(line) + "\n")
    day = tmp_path / "2024-05-01"
    day.mkdir()
    early = {"version": "v0001", "minute": MINUTE0 - 1, "counts": _counts(b1=1)}
    kept = {"version": "v0001", "minute": MINUTE0, "counts": _counts(b3=1)}
    (day / "r-1.jsonl").write_text(json.dumps(early) + "\n" + json.dumps(kept) + "\n")
    (tmp_path / "README").write_text("not a day folder")

    read = read_served_scores(tmp_path, T0 + timedelta(seconds=30))
    assert [(m, c.tolist()) for m, c in read["v0001"]] == [(MINUTE0, _counts(b3=1))]
    assert read_served_scores(tmp_path / "missing", T0) == {}


def test_read_tolerates_a_torn_last_line_and_bad_lines(tmp_path: Path) -> None:
    day = tmp_path / "2024-05-01"
    day.mkdir()
    good = {"version": "v0001", "minute": MINUTE0, "counts": _counts(b5=2)}
    short = {"version": "v0001", "minute": MINUTE0, "counts": [1, 2]}
    text = "\n".join(
        [json.dumps(good), "not json", json.dumps(short), json.dumps(good)[:-9]]  # torn
    )
    (day / "r-1.jsonl").write_text(text)
    read = read_served_scores(tmp_path, T0)
    assert [(m, c.tolist()) for m, c in read["v0001"]] == [(MINUTE0, _counts(b5=2))]
