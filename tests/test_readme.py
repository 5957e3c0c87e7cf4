"""The README stays true: its configuration table lists exactly the settings fdqueue reads."""

from __future__ import annotations

import re
from pathlib import Path

from fdqueue.config import Settings, env_name

README = Path(__file__).resolve().parents[1] / "README.md"


def test_configuration_table_matches_settings() -> None:
    """Every Settings field appears in the README table under its variable, and nothing else."""
    text = README.read_text(encoding="utf-8")
    table = text.split("## Configuration", 1)[1].split("## Operations", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.MULTILINE))
    expected = {env_name(name) for name in Settings.model_fields}
    assert documented == expected


def test_readme_names_the_two_commands() -> None:
    """The README shows `make run` and `make test`."""
    text = README.read_text(encoding="utf-8")
    assert "make run" in text
    assert "make test" in text
