"""Secrets from the environment or from files (never from the repository or `freshrec.json`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from freshrec.errors import InvalidArgument


def read_secret(inline: SecretStr | None, path: Path | None, field: str) -> str | None:
    """The secret given inline (from the environment) or in a file; None when neither is set.

    A file holds the secret on its first line; surrounding whitespace is dropped, so a trailing
    newline from `echo` or a Kubernetes secret mount does not become part of it.

    Raises:
        InvalidArgument: the file cannot be read, or the secret is empty.
    """
    if inline is not None:
        value = inline.get_secret_value().strip()
        source = f"security.{field}"
    elif path is not None:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise InvalidArgument(f"security.{field}_file: cannot read {path}: {exc}") from exc
        source = f"security.{field}_file ({path})"
    else:
        return None
    if not value:
        raise InvalidArgument(f"{source} must not be empty")
    return value
