"""deploy/grafana/freshrec-dashboard.json queries only metrics the services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import services.common.metrics  # noqa: F401  (registers the metrics)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "freshrec-dashboard.json"


def _exported_names() -> set[str]:
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in REGISTRY.collect():
        names.add(family.name)
        # A labelled metric has no samples until a label set is used: name them by type.
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def test_every_panel_queries_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported_names()
    panels = dashboard["panels"]
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"freshrec_[a-z0-9_]+", target["expr"]))
            assert used, target["expr"]
            missing = used - exported
            assert not missing, f"{panel['title']}: {sorted(missing)} not exported"


def test_every_freshrec_metric_has_a_panel() -> None:
    """A metric added without a panel is one an operator never sees."""
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"freshrec_[a-z0-9_]+", target["expr"])
    }
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in REGISTRY.collect()
        if family.name.startswith("freshrec_")
    }
    assert families - used == set()
