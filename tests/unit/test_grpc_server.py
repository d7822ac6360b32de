"""services/common/server.py: FreshRec errors and bugs become gRPC statuses at the boundary."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from freshrec.clients import channel, ranking_stub
from freshrec.errors import InvalidArgument
from freshrec.v1 import ranking_pb2, ranking_pb2_grpc
from services.common.server import create_server

SERVICE = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


class Servicer(ranking_pb2_grpc.RankingServiceServicer):
    """Answers with the name of the thread that ran the handler; k < 1 is a FreshRec error,
    user "boom" a bug."""

    def Recommend(self, request: Any, context: Any) -> ranking_pb2.RecommendResponse:
        if request.k < 1:
            raise InvalidArgument(f"k must be in 1..100, got {request.k}")
        if request.user_id == "boom":
            raise RuntimeError("a bug")
        return ranking_pb2.RecommendResponse(request_id=threading.current_thread().name)

    def LogEvents(self, request: Any, context: Any) -> ranking_pb2.LogEventsResponse:
        return ranking_pb2.LogEventsResponse(accepted=len(request.events))


def test_errors_map_to_statuses_and_the_server_keeps_answering() -> None:
    handle = create_server(
        "127.0.0.1",
        0,
        [(ranking_pb2_grpc.add_RankingServiceServicer_to_server, Servicer(), SERVICE)],
        workers=2,
    )
    try:
        with channel(f"127.0.0.1:{handle.port}") as ch:
            stub = ranking_stub(ch)
            reply = stub.Recommend(ranking_pb2.RecommendRequest(user_id="u", k=3), timeout=10)
            assert reply.request_id.startswith("grpc")  # on the server's worker threads
            with pytest.raises(grpc.RpcError) as bad:
                stub.Recommend(ranking_pb2.RecommendRequest(user_id="u", k=0), timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "k must be in 1..100, got 0" in bad.value.details()
            with pytest.raises(grpc.RpcError) as bug:
                stub.Recommend(ranking_pb2.RecommendRequest(user_id="boom", k=3), timeout=10)
            assert bug.value.code() == grpc.StatusCode.INTERNAL
            assert bug.value.details() == "internal error: RuntimeError"
            # A failed call leaves the server answering.
            events = ranking_pb2.LogEventsRequest(events=[ranking_pb2.Event(), ranking_pb2.Event()])
            assert stub.LogEvents(events, timeout=10).accepted == 2
            again = stub.Recommend(ranking_pb2.RecommendRequest(user_id="u", k=3), timeout=10)
            assert again.request_id.startswith("grpc")
    finally:
        handle.stop(0)
