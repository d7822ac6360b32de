"""Keeps prometheus_client in its in-process mode, whenever and wherever Feast is imported.

Importing any part of Feast runs `feast.metrics`, which creates a temporary directory and sets
PROMETHEUS_MULTIPROCESS_DIR and PROMETHEUS_MULTIPROC_DIR in the process environment (for its own
feature server), then imports prometheus_client. With them set:

- prometheus_client, when first imported after Feast, keeps every metric in files under that
  directory (its multi-process mode) instead of in memory;
- `Gauge.clear()` warns "Clearing labels has not been implemented in multi-process mode yet";
- every child process inherits the variables (the demo's services, test servers), so its
  metrics start in that mode too, in a directory the parent deletes when it exits.

FreshRec's services each serve their own metrics from memory (`ranking.metrics_port`), so
`install()` (run by services/common/metrics.py before any metric exists):

- registers an import hook that removes the variables again as soon as `feast.metrics` has run,
  when they were not set before it;
- if Feast was already imported, removes the variables it set (those naming its own directory)
  and puts prometheus_client's value class back to the in-process one.

Variables an operator set before the process started are left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

FEAST_METRICS = "feast.metrics"
MULTIPROCESS_ENV = ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR")

_installed = False


class _UndoFeastEnvironment(importlib.abc.MetaPathFinder):
    """Finds `feast.metrics` as the path finder does, and wraps its execution so that the
    variables it adds to the environment are removed once it has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != FEAST_METRICS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader: Any = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            unset = [name for name in MULTIPROCESS_ENV if name not in os.environ]
            try:
                run(module)
            finally:
                for name in unset:
                    os.environ.pop(name, None)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install() -> None:
    """Keep prometheus_client's metrics in memory in this process and its children (module
    docstring). Idempotent."""
    global _installed
    if _installed:
        return
    feast_metrics = sys.modules.get(FEAST_METRICS)
    if feast_metrics is None:
        sys.meta_path.insert(0, _UndoFeastEnvironment())
    elif getattr(feast_metrics, "_owns_mp_dir", False):
        own = getattr(feast_metrics, "_prometheus_mp_dir", None)
        for name in MULTIPROCESS_ENV:
            if own is not None and os.environ.get(name) == own:
                del os.environ[name]
    from prometheus_client import values

    if not any(n in os.environ for n in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")):
        values.ValueClass = values.MutexValue
    _installed = True
