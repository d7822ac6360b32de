"""How the `freshrec` processes write their logs: text lines (the default) or one JSON object a
line, for log pipelines that index fields (Loki, Elasticsearch, Cloud Logging).

`FRESHREC_LOG_FORMAT=json` picks JSON. A record's `extra` fields become fields of its object:
the ranking service's line for each `Recommend` carries `request_id`, `user`, `k`, `model`,
`degraded` and `total_ms`, so a request is found by its id without parsing the message. The
text format keeps them in the message (`recommend request_id=... user=...`) as before.

The formatter is python-json-logger's (a small, maintained library made for this), not our own:
it serialises extras, exceptions and stack info the way log shippers expect.
"""

from __future__ import annotations

import logging
import os

from freshrec.errors import InvalidArgument

LOG_FORMAT_ENV = "FRESHREC_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_format(environ: dict[str, str] | None = None) -> str:
    """The format `FRESHREC_LOG_FORMAT` asks for; "text" when it is unset or empty.

    Raises:
        InvalidArgument: any other value than "text" or "json".
    """
    env = os.environ if environ is None else environ
    value = env.get(LOG_FORMAT_ENV, "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise InvalidArgument(
            f"{LOG_FORMAT_ENV} must be one of {', '.join(LOG_FORMATS)}, got {value!r}"
        )
    return value


def formatter(kind: str) -> logging.Formatter:
    """A formatter for `kind` ("text" or "json"). JSON objects hold `ts` (ISO 8601, UTC),
    `level`, `logger`, `message`, every extra field of the record, and `exc_info` when the
    record has an exception."""
    if kind == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="ts",
        )
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: int = logging.INFO) -> None:
    """Root logging to stderr in the format `FRESHREC_LOG_FORMAT` asks for (the handler is not
    added when the root logger already has handlers, as with `logging.basicConfig`); in JSON,
    Python's warnings are logged too.

    Raises:
        InvalidArgument: an unknown format (before any handler is installed).
    """
    kind = log_format()
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level, handlers=[handler])
    if kind == "json":
        # A warning printed as it is would be a line a JSON log reader cannot parse: it goes
        # through logging instead (logger "py.warnings").
        logging.captureWarnings(True)
