"""docs/configuration.md's settings tables are the code's own."""

from __future__ import annotations

from freshrec.config import FreshRecConfig
from freshrec.config_docs import DOC, current_block, render


def test_the_configuration_reference_matches_the_code() -> None:
    block = current_block(DOC.read_text())
    assert block is not None, "docs/configuration.md lost its generated block"
    assert block == render(), "run: .venv/bin/python -m freshrec.config_docs --write"


def test_every_setting_has_a_description_and_a_row() -> None:
    text = render()
    for name, field in FreshRecConfig.model_fields.items():
        section = field.annotation
        fields = getattr(section, "model_fields", None)
        if fields:
            for sub, sub_field in fields.items():
                assert sub_field.description, f"{name}.{sub} has no description"
                assert f"`FRESHREC_{name.upper()}__{sub.upper()}`" in text
        else:
            assert field.description, f"{name} has no description"
            assert f"`FRESHREC_{name.upper()}`" in text
