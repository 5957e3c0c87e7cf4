"""An embedded PostgreSQL (the `pgserver` wheel's binaries) for `fdqueue dev` and the tests."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path

_SYSTEM_USER = "fdqueue-pg"  # PostgreSQL refuses to run as root


def _bin_dir() -> Path:
    """The pgserver wheel's binaries (found without importing it), else a pg_ctl on PATH."""
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent / "pginstall" / "bin"
    found = shutil.which("pg_ctl")
    if found is None:
        raise RuntimeError(
            "no PostgreSQL binaries: install the 'embedded' extra (pip install 'fdqueue[embedded]')"
        )
    return Path(found).resolve().parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """One private PostgreSQL server on 127.0.0.1, its data kept under `data_dir`.

    The data directory survives `stop()`, so the next `start()` is fast and keeps the rows.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.durable = durable
        self._bin = _bin_dir()
        self._user = _SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Initialise the data directory when new, start the server, wait until it accepts."""
        self._prepare()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            )
        options = f"-h 127.0.0.1 -p {self.port} -k ''"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            options,
            "start",
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown); a stopped server is left alone."""
        if self.running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-m", "fast", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; `start()` recovers."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, 9)

    def pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._user is None:
            return
        _ensure_user(self._user)
        entry = pwd.getpwnam(self._user)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        # The server user must be able to walk down to its data directory and to the
        # programs (a clone under a private 0700 folder would hide both): traverse only,
        # no listing, on every folder above them.
        for folder in {*self.data_dir.parents, *self._bin.parents}:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [str(self._bin / program), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            user=self._user,
            group=self._user,
            extra_groups=[] if self._user else None,
            cwd="/",
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
