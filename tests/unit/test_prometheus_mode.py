"""Importing Feast leaves FreshRec's metrics in memory and its children's environment clean
(services/common/prometheus_mode.py). Each case runs in a fresh interpreter: the test process
has imported both modules already, in some order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")
ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, subprocess, sys, warnings
{imports}
import prometheus_client.values as values
from services.common import metrics
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    metrics.SERVING_VERSION.clear()  # warns in prometheus_client's multi-process mode
child = subprocess.run(
    [sys.executable, "-c", "import os; print([k for k in {env!r} if k in os.environ])"],
    capture_output=True, text=True, check=True,
)
print(json.dumps({{
    "env": {{k: os.environ.get(k) for k in {env!r}}},
    "child_env": child.stdout.strip(),
    "value_class": values.ValueClass.__name__,
    "clear_warnings": len(caught),
    "counter_value": type(metrics.REQUESTS.labels(method="Probe", outcome="ok")._value).__name__,
}}))
"""


def _probe(imports: str, extra_env: dict[str, str] | None = None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(extra_env or {})
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports, env=ENV)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "imports",
    [
        "from services.common import metrics\nimport feast",  # the services' order
        "import feast\nfrom services.common import metrics",  # Feast first
    ],
    ids=["metrics-then-feast", "feast-then-metrics"],
)
def test_metrics_stay_in_memory_whichever_is_imported_first(imports: str) -> None:
    got = _probe(imports)

    assert got["env"] == {k: None for k in ENV}
    assert got["child_env"] == "[]"
    assert got["value_class"] == "MutexValue"
    assert got["counter_value"] == "MutexValue"
    assert got["clear_warnings"] == 0


def test_a_multiprocess_directory_the_operator_set_is_left_alone(tmp_path: Path) -> None:
    got = _probe(
        "from services.common import metrics\nimport feast",
        {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )

    env = got["env"]
    assert isinstance(env, dict) and env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    assert got["value_class"] != "MutexValue"  # prometheus_client's multi-process mode, as asked
