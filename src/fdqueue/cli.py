"""The `fdqueue` command: the one composition root, building Settings and handing them down."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from fdqueue import __version__, store
from fdqueue.config import EX_CONFIG, ConfigError, Settings, load_settings
from fdqueue.logs import configure_logging

EX_TEMPFAIL = 75  # sysexits: the database is unreachable, try again later
Command = Callable[[argparse.Namespace, Settings], int]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    if args.command == "fake-freshdesk":
        try:
            fmt = load_settings().log_format
        except ConfigError:
            fmt = "auto"
        configure_logging(fmt, "info")
        code: int = args.func(args)
        return code
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fdqueue: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(settings.log_format, settings.log_level)
    faulthandler.enable()  # a watchdog SIGABRT then shows the stuck Python stack
    try:
        result: int = args.handler(args, settings)
    except ConfigError as exc:
        print(f"fdqueue: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        print(f"fdqueue: database unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdqueue",
        description="Accept support tickets at once and deliver them to Freshdesk reliably.",
        epilog="Configuration comes from the environment: see `fdqueue show-config` and README.md.",
    )
    parser.add_argument("--version", action="version", version=f"fdqueue {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(command=name, handler=handler)
        return cmd

    command("api", _api, "run the HTTP API (intake, stats, manual processing)")
    command("worker", _worker, "run the delivery daemon")
    dev = command(
        "dev", _dev, "run everything locally: embedded PostgreSQL, simulator, api, worker"
    )
    dev.add_argument("--demo", action="store_true", help="post the sample submissions once up")
    dev.add_argument("--data-dir", default=".fdqueue", help="where the embedded database lives")
    command("migrate", _migrate, "apply pending database migrations (safe to run twice)")
    _json_flag(command("stats", _stats, "queue counts by status"))
    show = _json_flag(command("show", _show, "one row by queue id or public id (no ticket body)"))
    show.add_argument("id", help="queue id (number) or public id (uuid)")
    retry = _json_flag(
        command("retry-failed", _retry_failed, "send failed tickets back to pending now")
    )
    retry.add_argument("--id", type=int, help="only this queue id")
    purge = _json_flag(command("purge", _purge, "delete completed/failed rows older than a cutoff"))
    purge.add_argument(
        "--older-than", default=None, type=_duration, help="e.g. 7d, 12h, 30m (default: retention)"
    )
    command("check-config", _check_config, "validate the configuration; exit 0, or 78 when invalid")
    _json_flag(command("show-config", _show_config, "print the effective settings, secrets masked"))
    _add_simulator(sub)
    return parser


def _json_flag(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    return cmd


def _add_simulator(sub: Any) -> None:
    from fdqueue import simulator

    simulator.add_cli(sub)
    sub.choices["fake-freshdesk"].set_defaults(command="fake-freshdesk")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `45s`, `2w` or a plain number of days, in seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 7d, 12h, 30m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


# --- daemons ------------------------------------------------------------------------------


def _api(args: argparse.Namespace, settings: Settings) -> int:
    from fdqueue.api import serve_api

    return asyncio.run(serve_api(settings))


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from fdqueue.worker import serve_worker

    return asyncio.run(serve_worker(settings))


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from fdqueue.devrun import run_dev

    return run_dev(settings, data_dir=args.data_dir, demo=args.demo)


# --- administration -------------------------------------------------------------------------


def _with_db(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(
            settings.require_database(), timeout=settings.db_connect_timeout
        )
        try:
            await store.init_connection(conn)
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from fdqueue.migrate import migrate

    applied = _with_db(settings, migrate)
    print("\n".join(f"applied {name}" for name in applied) or "schema is up to date")
    return 0


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    stats = _with_db(settings, store.stats).as_dict()
    if args.json:
        return _print_json(stats)
    return _print_fields(stats)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    key: str = args.id.strip()

    async def find(conn: asyncpg.Connection) -> dict[str, Any] | None:
        if key.isdigit():
            return await store.get_by_id(conn, int(key))
        try:
            public_id = uuid.UUID(key)
        except ValueError:
            return None
        row = await store.get_by_public_id(conn, public_id)
        return None if row is None else await store.get_by_id(conn, row["id"])

    row = _with_db(settings, find)
    if row is None:
        print(f"fdqueue: no queued ticket {key!r}", file=sys.stderr)
        return 1
    if args.json:
        return _print_json(row)
    return _print_fields(row)


def _retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    count = _with_db(settings, lambda conn: store.retry_failed(conn, args.id))
    if args.json:
        return _print_json({"retried": count})
    if args.id is not None and not count:
        print(
            f"fdqueue: ticket {args.id} is not failed (or does not exist); nothing to retry",
            file=sys.stderr,
        )
        return 1
    print(f"{count} failed ticket(s) sent back to pending")
    return 0


def _purge(args: argparse.Namespace, settings: Settings) -> int:
    seconds = args.older_than if args.older_than is not None else settings.retention_days * 86400
    count = _with_db(settings, lambda conn: store.purge(conn, seconds, settings.cleanup_batch))
    if args.json:
        return _print_json({"deleted": count, "older_than_seconds": seconds})
    print(f"deleted {count} completed/failed ticket(s) older than {seconds / 86400:g} days")
    return 0


def _check_config(args: argparse.Namespace, settings: Settings) -> int:
    """Valid settings, and the ones the daemons need are there (database and Freshdesk)."""
    settings.check_required()
    print("configuration is valid")
    return 0


def _show_config(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.masked()
    if args.json:
        return _print_json(data)
    return _print_fields(data)


def _print_fields(data: dict[str, Any]) -> int:
    """One `name: value` line per field, names right-aligned, `-` for nothing."""
    width = max(map(len, data), default=0)
    for name, value in data.items():
        print(f"{name:>{width}}: {'-' if value is None else value}")
    return 0


def _print_json(data: Any) -> int:
    print(json.dumps(data, default=_json_default, sort_keys=True))
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
