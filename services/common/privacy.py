"""Pseudonymous ids: a keyed hash (HMAC-SHA256) replaces each raw user id at the edges.

The same key maps the same id to the same pseudonym, so profiles, the offline log and training
data stay joinable, while someone who reads them without the key cannot recover the ids nor
confirm a guess. Event ids are mapped too (under a separate domain), because shops and
MovieLens build them from the user id (`ml-<user>-<item>-<time>`); the mapping is
deterministic, so de-duplication of replayed events still works. Changing the key changes
every pseudonym (see docs/operations.md, Security).
"""

from __future__ import annotations

import hashlib
import hmac

from freshrec.config import FreshRecConfig
from freshrec.errors import InvalidArgument
from services.common.secrets import read_secret

USER_PREFIX = "u_"
EVENT_PREFIX = "e_"
HEX_CHARS = 32  # 128 bits: collisions are out of reach for any user base
MIN_KEY_BYTES = 16
_EVENT_DOMAIN = b"freshrec.event_id\x00"  # keeps event pseudonyms apart from user pseudonyms


def pseudonymize_user_id(key: bytes, user_id: str) -> str:
    """`u_` + the first 32 hex digits of HMAC-SHA256(key, user_id as UTF-8). Pure and stable."""
    digest = hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return USER_PREFIX + digest[:HEX_CHARS]


def pseudonymize_event_id(key: bytes, event_id: str) -> str:
    """`e_` + 32 hex digits of HMAC-SHA256(key, domain + event_id). Pure and stable."""
    digest = hmac.new(key, _EVENT_DOMAIN + event_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return EVENT_PREFIX + digest[:HEX_CHARS]


class Pseudonymizer:
    """Maps ids arriving at an edge (gRPC requests, `freshrec init`'s data set) to pseudonyms.

    Ids the request validators reject (empty, blank, longer than `max_id_chars`) pass through
    unchanged so that they are still rejected with the same reason; a rejected id is neither
    stored nor logged.
    """

    def __init__(self, key: bytes, max_id_chars: int = 128) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise InvalidArgument(
                f"security.user_id_key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}"
            )
        self._key = key
        self._max = max_id_chars

    def _valid(self, raw: str) -> bool:
        return bool(raw.strip()) and len(raw) <= self._max

    def user_id(self, raw: str) -> str:
        return pseudonymize_user_id(self._key, raw) if self._valid(raw) else raw

    def event_id(self, raw: str) -> str:
        return pseudonymize_event_id(self._key, raw) if self._valid(raw) else raw


def pseudonymizer(config: FreshRecConfig) -> Pseudonymizer | None:
    """The pseudonymizer `config.security` asks for, or None when pseudonymisation is off.

    Raises:
        InvalidArgument: pseudonymisation is on but no key is set, or the key is too short.
    """
    security = config.security
    if not security.pseudonymize_user_ids:
        return None
    key = read_secret(security.user_id_key, security.user_id_key_file, "user_id_key")
    if key is None:
        raise InvalidArgument(
            "security.pseudonymize_user_ids is on but no key is set: set "
            "FRESHREC_SECURITY__USER_ID_KEY or security.user_id_key_file"
        )
    return Pseudonymizer(key.encode("utf-8"))
