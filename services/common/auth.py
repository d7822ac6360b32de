"""Access control for the gRPC servers: a bearer token on chosen methods, and TLS/mTLS.

`TokenAuthInterceptor` guards the methods it is given (the updater's TriggerUpdate, Promote and
Rollback); every other method, health and reflection included, passes untouched. A refused call
never reaches the servicer, so it changes nothing:

    no `authorization` metadata, or not `Bearer <token>`   UNAUTHENTICATED
    a bearer token that is not the configured one          PERMISSION_DENIED

`server_credentials` turns the `security` section's certificate files into gRPC server
credentials (TLS; with a client CA, clients must present a certificate it signed: mTLS).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from freshrec.config import SecurityConfig
from freshrec.errors import InvalidArgument
from services.common.secrets import read_secret

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer "


def updater_token(security: SecurityConfig) -> str | None:
    """The configured updater token (env or file), or None when there is none.

    Raises:
        InvalidArgument: the token file cannot be read or the token is empty.
    """
    return read_secret(security.updater_token, security.updater_token_file, "updater_token")


def check_bearer(metadata: Iterable[tuple[str, Any]] | None, token: str) -> grpc.StatusCode | None:
    """None when `metadata` carries `authorization: Bearer <token>`, else the status to answer.

    The token comparison takes the same time wherever the strings differ (hmac.compare_digest).
    """
    values = [v for k, v in (metadata or ()) if k.lower() == AUTHORIZATION]
    if len(values) != 1 or not isinstance(values[0], str):
        return grpc.StatusCode.UNAUTHENTICATED
    value = values[0]
    if not value.lower().startswith(BEARER) or not value[len(BEARER) :].strip():
        return grpc.StatusCode.UNAUTHENTICATED
    presented = value[len(BEARER) :].strip().encode("utf-8")
    if not hmac.compare_digest(presented, token.encode("utf-8")):
        return grpc.StatusCode.PERMISSION_DENIED
    return None


_MESSAGES = {
    grpc.StatusCode.UNAUTHENTICATED: "this call needs 'authorization: Bearer <token>' metadata",
    grpc.StatusCode.PERMISSION_DENIED: "the bearer token is not valid for this service",
}


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires the bearer token on `methods` (full names, `/package.Service/Method`)."""

    def __init__(self, token: str, methods: Iterable[str]) -> None:
        if not token:
            raise InvalidArgument("the updater token must not be empty")
        self._token = token
        self._methods = frozenset(methods)

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        method = handler_call_details.method
        if method not in self._methods:
            return continuation(handler_call_details)
        code = check_bearer(handler_call_details.invocation_metadata, self._token)
        if code is None:
            return continuation(handler_call_details)
        log.warning("refused %s: %s", method, code.name)
        message = f"{method}: {_MESSAGES[code]}"

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        # No deserializer: the refused request is never parsed.
        return grpc.unary_unary_rpc_method_handler(refuse)


def server_credentials(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from `security` (mTLS when a client CA is set); None = plaintext.

    Raises:
        InvalidArgument: a configured certificate, key or CA file cannot be read.
    """
    if security.tls_cert_file is None or security.tls_key_file is None:
        return None
    cert = _read_pem(security.tls_cert_file, "tls_cert_file")
    key = _read_pem(security.tls_key_file, "tls_key_file")
    client_ca = (
        _read_pem(security.tls_client_ca_file, "tls_client_ca_file")
        if security.tls_client_ca_file is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(path: Any, field: str) -> bytes:
    try:
        return bytes(path.read_bytes())
    except OSError as exc:
        raise InvalidArgument(f"security.{field}: cannot read {path}: {exc}") from exc
