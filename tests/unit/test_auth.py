"""The updater's bearer-token check and secret files (no network)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr, ValidationError

from freshrec.config import SecurityConfig
from freshrec.errors import InvalidArgument
from services.common.auth import check_bearer, server_credentials, updater_token
from services.common.secrets import read_secret

TOKEN = "s3cret-token"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-other", "1"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", TOKEN),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
        (
            (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {TOKEN}x"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {TOKEN}"),), None),
        ((("authorization", f"bearer {TOKEN}"),), None),
    ],
)
def test_check_bearer(metadata: object, expected: grpc.StatusCode | None) -> None:
    assert check_bearer(metadata, TOKEN) == expected  # type: ignore[arg-type]


def test_token_from_env_value_or_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")

    assert updater_token(SecurityConfig()) is None
    assert updater_token(SecurityConfig(updater_token=SecretStr(TOKEN))) == TOKEN
    assert updater_token(SecurityConfig(updater_token_file=token_file)) == TOKEN


def test_empty_or_missing_secret_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")

    with pytest.raises(InvalidArgument, match="must not be empty"):
        read_secret(None, empty, "updater_token")
    with pytest.raises(InvalidArgument, match="cannot read"):
        read_secret(None, tmp_path / "missing", "updater_token")


@pytest.mark.parametrize(
    "fields",
    [
        {"updater_token": "a", "updater_token_file": "/f"},
        {"user_id_key": "a", "user_id_key_file": "/f"},
        {"tls_cert_file": "/c"},
        {"tls_key_file": "/k"},
        {"tls_client_ca_file": "/ca"},
    ],
)
def test_inconsistent_security_settings_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        SecurityConfig(**fields)  # type: ignore[arg-type]


def test_no_certificate_means_plaintext() -> None:
    assert server_credentials(SecurityConfig()) is None
