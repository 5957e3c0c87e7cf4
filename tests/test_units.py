"""Tests for systemd/: units pass systemd-analyze, broken copies fail, units and config agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from fdqueue.config import Settings, env_name, load_settings

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
SCRIPT = UNIT_DIR / "check-units.sh"
DAEMONS = ("fdqueue-api.service", "fdqueue-worker.service")
_SETTING_LINE = re.compile(r"^#?([A-Z][A-Z0-9_]*)=(.*)$")
_OWN_VARIABLES = ("FDQUEUE_", "DATABASE_URL", "FRESHDESK_", "CREDENTIALS_DIRECTORY")


def _run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), str(directory)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


@pytest.fixture(scope="module")
def shipped_check() -> subprocess.CompletedProcess[str]:
    """check-units.sh on the shipped units; skips when systemd-analyze cannot be had."""
    if shutil.which("systemd-analyze") is None and (
        os.geteuid() != 0 or shutil.which("apt-get") is None
    ):
        pytest.skip("systemd-analyze is missing and cannot be installed (needs root and apt-get)")
    result = _run_check(UNIT_DIR)
    if "systemd-analyze unavailable" in result.stdout:
        pytest.skip("systemd-analyze is missing and installing Debian's systemd package failed")
    return result


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """A private copy of systemd/ to break on purpose."""
    copy = tmp_path / "units"
    shutil.copytree(UNIT_DIR, copy)
    return copy


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No fdqueue variable from the developer's shell leaks into Settings."""
    for name in list(os.environ):
        if name.startswith(_OWN_VARIABLES):
            monkeypatch.delenv(name)
    return monkeypatch


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new))


def _directives(unit: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (sections ignored; their keys do not collide here)."""
    found: dict[str, list[str]] = defaultdict(list)
    for line in (UNIT_DIR / unit).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found[key].append(value)
    return found


def _seconds(value: str) -> float:
    """systemd time spans as used in these units: `60s`, `2min`, `1h`."""
    match = re.fullmatch(r"(\d+)(s|min|h)", value)
    assert match is not None, f"unexpected time span {value!r}"
    return int(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2)]


def test_shipped_units_pass_verify_and_security(
    shipped_check: subprocess.CompletedProcess[str],
) -> None:
    """Every shipped unit verifies cleanly and each service scores at most 2.0 exposure."""
    assert shipped_check.returncode == 0, shipped_check.stdout + shipped_check.stderr
    assert shipped_check.stderr == ""
    for service in (*DAEMONS, "fdqueue-cleanup.service"):
        assert f"Overall exposure level for {service}" in shipped_check.stdout


def test_a_typo_in_a_directive_fails_the_check(
    shipped_check: subprocess.CompletedProcess[str], unit_copy: Path
) -> None:
    """A misspelt key, only a warning for plain verify, fails check-units.sh."""
    _edit(unit_copy / "fdqueue-api.service", "ProtectSystem=strict", "ProtectSytem=strict")
    result = _run_check(unit_copy)
    assert result.returncode != 0
    assert "Unknown key 'ProtectSytem'" in result.stderr


def test_a_bad_value_fails_the_check(
    shipped_check: subprocess.CompletedProcess[str], unit_copy: Path
) -> None:
    """An unparsable value (`Restart=sometimes`) fails check-units.sh."""
    _edit(unit_copy / "fdqueue-worker.service", "Restart=on-failure", "Restart=sometimes")
    result = _run_check(unit_copy)
    assert result.returncode != 0
    assert "sometimes" in result.stderr


def test_a_weak_sandbox_fails_the_security_threshold(
    shipped_check: subprocess.CompletedProcess[str], unit_copy: Path
) -> None:
    """A service stripped of its sandbox scores above 2.0 and fails the check."""
    unit = unit_copy / "fdqueue-worker.service"
    kept = [
        line
        for line in unit.read_text().splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    ]
    unit.write_text("\n".join(kept) + "\n")
    result = _run_check(unit_copy)
    assert result.returncode != 0
    assert "FAIL security: fdqueue-worker.service" in result.stdout


@pytest.mark.parametrize("unit", DAEMONS)
def test_b22_daemons_notify_readiness_and_are_watched(unit: str) -> None:
    """Both daemons are Type=notify with a watchdog, restart on failure but not on exit 78."""
    d = _directives(unit)
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert _seconds(d["WatchdogSec"][0]) > 0
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]
    assert d["KillMode"] == ["mixed"]
    assert d["ExecStartPre"] == ["/opt/fdqueue/venv/bin/fdqueue check-config"]
    assert d["User"] == ["fdqueue"]


def test_worker_stop_timeout_outlasts_its_drain_grace() -> None:
    """systemd waits longer than the worker's default shutdown grace before SIGKILL."""
    grace = Settings.model_fields["shutdown_grace"].default
    stop_timeout = _seconds(_directives("fdqueue-worker.service")["TimeoutStopSec"][0])
    assert stop_timeout >= 2 * grace


@pytest.mark.parametrize("unit", DAEMONS)
def test_the_units_credential_is_read_as_the_freshdesk_key(
    unit: str, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """The file LoadCredential= places in $CREDENTIALS_DIRECTORY is read as the API key."""
    (credential,) = _directives(unit)["LoadCredential"]
    name = credential.split(":", 1)[0]
    (tmp_path / name).write_text("fd-key-from-credential\n")
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    key = load_settings().freshdesk_api_key
    assert key is not None
    assert key.get_secret_value() == "fd-key-from-credential"


def _example_assignments(*, uncomment: bool) -> dict[str, str]:
    """NAME=value lines of fdqueue.env.example, optionally with `#NAME=default` lines too."""
    found = {}
    for line in (UNIT_DIR / "fdqueue.env.example").read_text().splitlines():
        match = _SETTING_LINE.match(line)
        if match and (uncomment or not line.startswith("#")):
            found[match.group(1)] = match.group(2)
    return found


def test_env_example_documents_every_setting() -> None:
    """Each Settings field has its variable in fdqueue.env.example, and nothing unknown is there."""
    documented = set(_example_assignments(uncomment=True))
    expected = {env_name(field) for field in Settings.model_fields}
    assert documented == expected


def test_b25_env_example_defaults_match_the_code(clean_env: pytest.MonkeyPatch) -> None:
    """Uncommenting every documented default yields exactly the built-in defaults."""
    for name, value in _example_assignments(uncomment=True).items():
        clean_env.setenv(name, value)
    assert load_settings().masked() == Settings().masked()


def test_b25_env_example_as_shipped_leaves_required_settings_missing(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """The shipped `DATABASE_URL=` and `FRESHDESK_DOMAIN=` lines count as not set."""
    shipped = _example_assignments(uncomment=False)
    assert shipped == {"DATABASE_URL": "", "FRESHDESK_DOMAIN": ""}
    for name, value in shipped.items():
        clean_env.setenv(name, value)
    settings = load_settings()
    assert settings.database_url is None
    assert settings.freshdesk_url is None
