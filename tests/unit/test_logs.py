"""Log formats: text by default, one JSON object a line with FRESHREC_LOG_FORMAT=json, and the
ranking service's per-request fields on its records (freshrec/logs.py)."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from freshrec.errors import InvalidArgument
from freshrec.logs import LOG_FORMAT_ENV, formatter, log_format
from freshrec.v1 import ranking_pb2
from services.ranking.pipeline import Recommendation, ScoredItem
from services.ranking.servicer import RankingServicer


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "services.ranking.servicer", logging.INFO, __file__, 1, msg, args, None
    )
    record.__dict__.update(extra)
    return record


def test_a_json_record_holds_level_logger_message_time_and_its_extra_fields() -> None:
    line = formatter("json").format(_record("recommend user=%s", "u1", request_id="r-1", k=10))

    obj = json.loads(line)
    assert obj["level"] == "INFO"
    assert obj["logger"] == "services.ranking.servicer"
    assert obj["message"] == "recommend user=u1"
    assert obj["request_id"] == "r-1" and obj["k"] == 10
    assert obj["ts"].endswith("+00:00")  # ISO 8601, UTC
    assert "\n" not in line


def test_a_json_record_of_an_exception_carries_the_traceback() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())

    obj = json.loads(formatter("json").format(record))

    assert obj["message"] == "failed"
    assert "ValueError: bad thing" in obj["exc_info"]


def test_the_text_format_is_the_one_line_of_before() -> None:
    line = formatter("text").format(_record("recommend user=%s", "u1", request_id="r-1"))

    assert line.endswith(" INFO services.ranking.servicer: recommend user=u1")
    assert "r-1" not in line  # extras stay out of the text line (the message carries them)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "text"), ("", "text"), ("json", "json"), (" JSON ", "json")]
)
def test_the_format_comes_from_the_environment(value: str | None, expected: str) -> None:
    env = {} if value is None else {LOG_FORMAT_ENV: value}

    assert log_format(env) == expected


def test_an_unknown_format_is_an_error_that_names_the_variable() -> None:
    with pytest.raises(
        InvalidArgument, match=f"{LOG_FORMAT_ENV} must be one of text, json, got 'xml'"
    ):
        log_format({LOG_FORMAT_ENV: "xml"})


class _Pipeline:
    def recommend(self, req: Any, models: Any) -> Recommendation:
        self.req = req
        return Recommendation(
            [ScoredItem("i1", 0.9, 0.9, 1.0, "recall")],
            "v0007",
            "v0003",
            timings_ms={"total": 4.25},
            relevance=np.array([0.9], dtype=np.float32),
        )


def test_each_recommend_record_carries_the_request_s_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = RankingServicer(_Pipeline(), SimpleNamespace(current=None), ingestor=None)  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO, logger="services.ranking.servicer"):
        reply = servicer.Recommend(
            ranking_pb2.RecommendRequest(user_id="u42", k=3, request_id="req-9"), None
        )

    assert [i.item_id for i in reply.items] == ["i1"]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("recommend ")]
    fields = {
        k: getattr(record, k) for k in ("request_id", "user", "k", "model", "degraded", "total_ms")
    }
    assert fields == {
        "request_id": "req-9",
        "user": "u42",
        "k": 3,
        "model": "v0007",
        "degraded": False,
        "total_ms": 4.25,
    }
    assert json.loads(formatter("json").format(record))["request_id"] == "req-9"


def test_json_logging_routes_python_warnings_through_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import warnings

    from freshrec.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:]
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    try:
        root.handlers = []
        configure_logging()
        (handler,) = root.handlers
        seen: list[logging.LogRecord] = []
        handler.emit = seen.append  # type: ignore[method-assign]
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("an old API", DeprecationWarning, stacklevel=1)
        assert [r.name for r in seen] == ["py.warnings"]
        assert "an old API" in json.loads(handler.format(seen[0]))["message"]
    finally:
        logging.captureWarnings(False)
        root.handlers = saved


class _Ingestor:
    def ingest(self, events: Any) -> Any:
        from collections import Counter

        from services.ingestion.pipeline import IngestResult

        return IngestResult(accepted=2, rejected=Counter({"duplicate": 1}))


def test_each_log_events_record_carries_the_batch_s_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = RankingServicer(_Pipeline(), SimpleNamespace(current=None), _Ingestor())  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO, logger="services.ranking.servicer"):
        reply = servicer.LogEvents(ranking_pb2.LogEventsRequest(), None)

    assert (reply.accepted, reply.rejected) == (2, 1)
    (record,) = [r for r in caplog.records if r.getMessage().startswith("log_events ")]
    obj = json.loads(formatter("json").format(record))
    assert (obj["accepted"], obj["rejected"]) == (2, {"duplicate": 1})
