"""gRPC server plumbing shared by both services.

`create_server` registers the servicers, gRPC health checking (NOT_SERVING until `mark_serving`)
and server reflection, and installs one interceptor that maps FreshRec errors to statuses.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from freshrec.errors import FreshRecError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GRACE_SECONDS = 5.0  # in-flight calls get this long to finish after SIGTERM
# After SIGTERM, health reads NOT_SERVING while calls are still taken for this long, so load
# balancers and clients polling health move away before the server starts refusing.
DRAIN_SECONDS = 1.0


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns FreshRecError into its gRPC status with the error's message; anything else is
    logged with its traceback and answered INTERNAL (never a crashed worker)."""

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except FreshRecError as exc:
                context.abort(exc.grpc_status_code(), str(exc))
            except Exception as exc:  # the one place that catches everything: the RPC boundary
                if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                    raise
                log.exception("unhandled error in %s", method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class ServerHandle:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]

    def mark_serving(self) -> None:
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def mark_not_serving(self) -> None:
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float = 5.0) -> None:
        """Health goes NOT_SERVING first, then in-flight calls get `grace` seconds."""
        self.mark_not_serving()
        self.server.stop(grace).wait()


def create_server(
    host: str,
    port: int,
    register: Iterable[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    workers: int = 8,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> ServerHandle:
    """Build and start a server; `register` holds (add_XServicer_to_server, servicer, full name).

    Binds `host:port` (port 0 picks a free one) and returns the handle with the bound port.

    Args:
        credentials: TLS server credentials (services/common/auth.py); None serves plaintext.
        interceptors: run before the error-mapping one (e.g. the updater's token check).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=[*interceptors, ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    names = []
    for add, servicer, name in register:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{host}:{port}"
    bound = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    handle = ServerHandle(server, bound, health_servicer, tuple(names))
    handle.mark_not_serving()
    server.start()
    return handle


def wait_for_termination(
    handle: ServerHandle,
    grace: float = GRACE_SECONDS,
    on_stop: Callable[[], None] | None = None,
    drain: float = DRAIN_SECONDS,
) -> None:
    """Block until SIGTERM/SIGINT, then stop gracefully.

    Health goes NOT_SERVING at once; calls are still accepted for `drain` seconds, then new
    ones are refused (UNAVAILABLE) and in-flight ones get `grace` seconds to finish.
    """
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        log.info("signal %s: draining for up to %.1fs", signum, grace)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    stop.wait()
    handle.mark_not_serving()
    time.sleep(drain)
    if on_stop is not None:
        on_stop()
    handle.stop(grace)
