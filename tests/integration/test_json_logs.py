"""`freshrec serve ranking` as a real process with FRESHREC_LOG_FORMAT=json: its log is one JSON
object a line, and each Recommend's object carries the request's fields (freshrec/logs.py). A
format it does not know stops the command with a one-line error, before it starts anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from live_stack import free_port

from freshrec.clients import channel, ranking_stub, wait_serving
from freshrec.config import FreshRecConfig
from freshrec.v1 import ranking_pb2

pytestmark = pytest.mark.integration

SERVE = [sys.executable, "-m", "freshrec.cli", "serve", "ranking"]


def test_the_ranking_service_logs_json_with_each_request_s_fields(
    shop_workdir: FreshRecConfig, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "ranking.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FRESHREC_LOG_FORMAT": "json"}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [*SERVE, "--workdir", str(shop_workdir.workdir), "--port", str(port)],
            stdout=log_file,  # stdout and stderr in one stream, as a container's log is
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_serving(address, timeout=180)
        with channel(address) as ch:
            stub = ranking_stub(ch)
            for n in range(3):
                reply = stub.Recommend(
                    ranking_pb2.RecommendRequest(user_id=f"u{n}", k=5, request_id=f"json-{n}"),
                    timeout=60,
                )
                assert reply.request_id == f"json-{n}"
        proc.terminate()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    # Every line of the stream is a JSON object: no text log line, no plain start line.
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, not_json[:3]
    records = [json.loads(line) for line in lines]
    assert any(r["message"].startswith("ranking service on port") for r in records)
    by_id = {r["request_id"]: r for r in records if "request_id" in r}
    for n in range(3):
        r = by_id[f"json-{n}"]
        assert r["level"] == "INFO" and r["logger"] == "services.ranking.servicer"
        assert r["user"] == f"u{n}" and r["k"] == 5
        assert r["model"] == reply.model_version
        assert r["degraded"] is False and r["total_ms"] > 0
        assert r["message"].startswith(f"recommend request_id=json-{n} ")


def test_an_unknown_log_format_is_a_one_line_error(tmp_path: Path) -> None:
    env = {**os.environ, "FRESHREC_LOG_FORMAT": "xml"}
    result = subprocess.run(
        [*SERVE, "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2
    assert "Traceback" not in output
    assert "FRESHREC_LOG_FORMAT must be one of text, json, got 'xml'" in output
    assert not (tmp_path / "work").exists()
