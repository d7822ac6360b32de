"""Thin gRPC clients for the two services (used by the CLI, the demo and the tests)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.v1 import ranking_pb2_grpc, updater_pb2_grpc


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)


def ranking_stub(ch: grpc.Channel) -> ranking_pb2_grpc.RankingServiceStub:
    return ranking_pb2_grpc.RankingServiceStub(ch)


def updater_stub(ch: grpc.Channel) -> updater_pb2_grpc.UpdaterServiceStub:
    return updater_pb2_grpc.UpdaterServiceStub(ch)


def wait_serving(address: str, timeout: float = 120.0, service: str = "") -> None:
    """Block until the server at `address` reports SERVING through gRPC health.

    Raises:
        TimeoutError: it did not within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    with channel(address) as ch:
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
