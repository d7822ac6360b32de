"""FreshRec's error hierarchy. Each error knows the gRPC status it maps to.

    FreshRecError                       INTERNAL
    ├── InvalidArgument                 INVALID_ARGUMENT  (a request field is out of range)
    ├── NotFound                        NOT_FOUND         (an unknown model version, ...)
    ├── FailedPrecondition              FAILED_PRECONDITION (nothing to roll back to, ...)
    ├── Unavailable                     UNAVAILABLE
    │   └── FeatureStoreUnavailable     (the online store could not be read)
    └── ArtifactError                   FAILED_PRECONDITION (a model/index version is corrupt)

Third-party exceptions are translated where they enter our code (`raise X(...) from exc`);
one server interceptor (services/common/server.py) turns these into gRPC statuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grpc is imported lazily so pure code (model/) can raise these errors
    import grpc


class FreshRecError(Exception):
    """Base of every error FreshRec raises on purpose."""

    code: str = "INTERNAL"  # name of the grpc.StatusCode

    def grpc_status_code(self) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.code]


class InvalidArgument(FreshRecError, ValueError):
    """A caller-supplied value is malformed or out of range; the message names the field."""

    code = "INVALID_ARGUMENT"


class NotFound(FreshRecError, KeyError):
    """A named thing (model version, item) does not exist."""

    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class FailedPrecondition(FreshRecError):
    """The system is not in a state where the operation makes sense."""

    code = "FAILED_PRECONDITION"


class Unavailable(FreshRecError):
    """A dependency is down; retrying later may succeed."""

    code = "UNAVAILABLE"


class FeatureStoreUnavailable(Unavailable):
    """The online feature store (Redis/SQLite via Feast) could not be read or written."""


class ArtifactError(FreshRecError):
    """A model or index version failed verification (sha256, config, missing files)."""

    code = "FAILED_PRECONDITION"
