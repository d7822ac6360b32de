"""User-id pseudonymisation: the keyed hash, the edge mapper, bootstrap's mapping, config."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from pydantic import SecretStr

from freshrec.config import load_config
from freshrec.errors import InvalidArgument
from services.common.privacy import (
    Pseudonymizer,
    pseudonymize_event_id,
    pseudonymize_user_id,
    pseudonymizer,
)
from services.jobs.bootstrap import pseudonymize_interactions

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
PSEUDONYM = re.compile(r"^u_[0-9a-f]{32}$")


def test_pseudonym_is_stable_and_shaped() -> None:
    first = pseudonymize_user_id(KEY, "alice@example.com")

    assert first == pseudonymize_user_id(KEY, "alice@example.com")
    assert PSEUDONYM.match(first)
    assert "alice" not in first


def test_pseudonym_depends_on_the_key_and_the_id() -> None:
    assert pseudonymize_user_id(KEY, "u1") != pseudonymize_user_id(OTHER_KEY, "u1")
    assert pseudonymize_user_id(KEY, "u1") != pseudonymize_user_id(KEY, "u2")


def test_pseudonym_is_the_documented_hmac() -> None:
    import hashlib
    import hmac

    expected = "u_" + hmac.new(KEY, "ü-42".encode(), hashlib.sha256).hexdigest()[:32]

    assert pseudonymize_user_id(KEY, "ü-42") == expected


def test_event_ids_use_their_own_domain() -> None:
    assert pseudonymize_event_id(KEY, "x").startswith("e_")
    assert pseudonymize_event_id(KEY, "x")[2:] != pseudonymize_user_id(KEY, "x")[2:]


@pytest.mark.parametrize("raw", ["", "   ", "x" * 129])
def test_ids_the_validators_reject_pass_through_unchanged(raw: str) -> None:
    mapper = Pseudonymizer(KEY)

    assert mapper.user_id(raw) == raw
    assert mapper.event_id(raw) == raw


def test_a_short_key_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="at least 16 bytes"):
        Pseudonymizer(b"short")


def test_config_off_gives_no_pseudonymizer(tmp_path: Path) -> None:
    assert pseudonymizer(load_config(tmp_path)) is None


def test_config_on_without_a_key_is_an_error(tmp_path: Path) -> None:
    config = load_config(tmp_path, security={"pseudonymize_user_ids": True})

    with pytest.raises(InvalidArgument, match="FRESHREC_SECURITY__USER_ID_KEY"):
        pseudonymizer(config)


def test_config_key_from_env_and_from_file_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "user_id.key"
    key_file.write_text("a-sufficiently-long-key\n")
    from_file = load_config(
        tmp_path, security={"pseudonymize_user_ids": True, "user_id_key_file": key_file}
    )
    monkeypatch.setenv("FRESHREC_SECURITY__USER_ID_KEY", "a-sufficiently-long-key")
    monkeypatch.setenv("FRESHREC_SECURITY__PSEUDONYMIZE_USER_IDS", "true")
    from_env = load_config(tmp_path / "other")

    a, b = pseudonymizer(from_file), pseudonymizer(from_env)

    assert a is not None and b is not None
    assert (
        a.user_id("u7") == b.user_id("u7") == pseudonymize_user_id(b"a-sufficiently-long-key", "u7")
    )


def test_saved_config_holds_no_secret(tmp_path: Path) -> None:
    from freshrec.config import save_config

    config = load_config(
        tmp_path,
        security={
            "pseudonymize_user_ids": True,
            "user_id_key": SecretStr("key-that-must-not-be-saved"),
            "updater_token": "token-that-must-not-be-saved",
        },
    )

    text = save_config(config).read_text()

    assert "must-not-be-saved" not in text
    reloaded = load_config(tmp_path)
    assert reloaded.security.pseudonymize_user_ids
    assert reloaded.security.user_id_key is None and reloaded.security.updater_token is None


def test_pseudonymize_interactions_maps_users_and_events_and_keeps_its_input() -> None:
    frame = pd.DataFrame(
        {
            "event_id": ["ml-alice-1-0", "ml-bob-2-0", "ml-alice-3-0"],
            "user_id": ["alice", "bob", "alice"],
            "item_id": ["1", "2", "3"],
        }
    )
    before = frame.copy()

    out = pseudonymize_interactions(frame, Pseudonymizer(KEY))

    pd.testing.assert_frame_equal(frame, before)
    assert out["user_id"].tolist() == [
        pseudonymize_user_id(KEY, "alice"),
        pseudonymize_user_id(KEY, "bob"),
        pseudonymize_user_id(KEY, "alice"),
    ]
    assert out["event_id"].str.startswith("e_").all()
    assert not out.astype(str).apply(lambda col: col.str.contains("alice|bob")).any().any()
    assert out["item_id"].tolist() == ["1", "2", "3"]
