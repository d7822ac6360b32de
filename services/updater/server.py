"""Wires the updater service: registry + offline event log behind UpdaterService over gRPC."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from freshrec.config import FreshRecConfig
from freshrec.v1 import updater_pb2, updater_pb2_grpc
from services.common import metrics
from services.common.auth import TokenAuthInterceptor, server_credentials, updater_token
from services.common.server import ServerHandle, create_server
from services.ingestion.offline_log import OfflineEventLog
from services.registry import open_registry
from services.updater.job import RerankerFactory
from services.updater.service import UpdaterServicer
from services.updater.triggers import TriggerScheduler

log = logging.getLogger(__name__)

SERVICE_NAME = updater_pb2.DESCRIPTOR.services_by_name["UpdaterService"].full_name
# Methods that change the registry; GetStatus, ListVersions, health and reflection stay open.
MUTATING_METHODS = tuple(f"/{SERVICE_NAME}/{m}" for m in ("TriggerUpdate", "Promote", "Rollback"))


@dataclass
class UpdaterApp:
    handle: ServerHandle
    servicer: UpdaterServicer

    @property
    def port(self) -> int:
        return self.handle.port

    def stop(self, grace: float = 5.0) -> None:
        if self.servicer.scheduler is not None:
            self.servicer.scheduler.stop()
        self.handle.stop(grace)


def build_updater(
    config: FreshRecConfig,
    port: int | None = None,
    load_reranker: RerankerFactory | None = None,
    clock: Callable[[], float] = time.time,
) -> UpdaterApp:
    """Start an updater server for `config.workdir`; cleans staging left by a killed run.

    `clock` is the wall clock of the serving-time signals (score_psi); tests move it.
    """
    registry = open_registry(config)
    for kind in ("reranker", "index"):
        if removed := registry.clean_staging(kind):
            log.warning("removed %d unfinished %s staging directories", removed, kind)
    servicer = UpdaterServicer(
        config, registry, OfflineEventLog(config.offline_dir), load_reranker, clock
    )
    token = updater_token(config.security)
    handle = create_server(
        config.updater.host,
        config.updater.port if port is None else port,
        [(updater_pb2_grpc.add_UpdaterServiceServicer_to_server, servicer, SERVICE_NAME)],
        workers=4,
        credentials=server_credentials(config.security),
        interceptors=[TokenAuthInterceptor(token, MUTATING_METHODS)] if token else [],
    )
    if token is None and config.security.tls_client_ca_file is None:
        log.warning(
            "SECURITY: no updater token (FRESHREC_SECURITY__UPDATER_TOKEN or "
            "security.updater_token_file) and no mTLS (security.tls_client_ca_file): "
            "TriggerUpdate, Promote and Rollback on port %d are open to anyone who can reach it",
            handle.port,
        )
    if config.updater.metrics_port:
        metrics.serve_metrics(config.updater.metrics_port)
    handle.mark_serving()
    # Automatic updates (schedule, drift thresholds): a no-op thread when both are off.
    servicer.scheduler = TriggerScheduler(servicer, config.updater)
    servicer.scheduler.start()
    log.info("updater service on port %d", handle.port)
    return UpdaterApp(handle, servicer)
