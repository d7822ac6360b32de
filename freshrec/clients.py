"""Thin gRPC clients for the two services (used by the CLI, the demo and the tests).

`channel(address, tls=ClientTLS(...), token=...)` opens a plaintext, TLS or mTLS channel and,
with a token, sends `authorization: Bearer <token>` on every call (the updater requires it on
TriggerUpdate, Promote and Rollback when it is configured with one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.records import ItemFeatures
from freshrec.v1 import catalog_pb2, ranking_pb2_grpc, updater_pb2_grpc


@dataclass(frozen=True)
class ClientTLS:
    """PEM files for a TLS channel: the CA that signed the server's certificate, and for mTLS
    the client's own certificate and key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files.

        Raises:
            ValueError: only one of cert_file and key_file is given.
            OSError: a file cannot be read.
        """
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS client certificate and key go together (--tls-cert, --tls-key)")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to each unary call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = [*(client_call_details.metadata or ()), self._header]
        return continuation(client_call_details._replace(metadata=metadata), request)


def channel(address: str, tls: ClientTLS | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to `address`: plaintext, or TLS/mTLS with `tls`; with `token`, every call
    carries it as a bearer token (use TLS when the token crosses a network)."""
    ch = (
        grpc.insecure_channel(address)
        if tls is None
        else grpc.secure_channel(address, tls.credentials())
    )
    return grpc.intercept_channel(ch, _BearerToken(token)) if token else ch


def relisting(item_id: str, like: ItemFeatures) -> catalog_pb2.CatalogItem:
    """An in-stock `UpsertItems` item `item_id` with the listing of `like` (title, text,
    category, brand, price): what benchmarks and tests add as a new item whose text embeds
    as `like`'s, so that recall finds it where it finds `like`."""
    return catalog_pb2.CatalogItem(
        item_id=item_id,
        title=like.title,
        description=like.text,
        category=like.category,
        brand=like.brand,
        price=like.price,
        in_stock=True,
    )


def ranking_stub(ch: grpc.Channel) -> ranking_pb2_grpc.RankingServiceStub:
    return ranking_pb2_grpc.RankingServiceStub(ch)


def updater_stub(ch: grpc.Channel) -> updater_pb2_grpc.UpdaterServiceStub:
    return updater_pb2_grpc.UpdaterServiceStub(ch)


def wait_serving(
    address: str, timeout: float = 120.0, service: str = "", tls: ClientTLS | None = None
) -> None:
    """Block until the server at `address` reports SERVING through gRPC health.

    Raises:
        TimeoutError: it did not within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    with channel(address, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f} s")
