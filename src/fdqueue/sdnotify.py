"""sd_notify(3) client: READY / STATUS / STOPPING / WATCHDOG datagrams to `$NOTIFY_SOCKET`.

The variables read here (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`) are systemd's
protocol with the running process, not settings, so they are read at call time and never
at import time.
"""

from __future__ import annotations

import asyncio
import os
import socket

from fdqueue.logs import get_logger

log = get_logger(__name__)


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=idle") to systemd as one datagram.

    Returns True when the datagram was handed to the kernel, False outside systemd
    (no `$NOTIFY_SOCKET`), with nothing to send, or when sending failed. Never blocks and
    never raises: a failure is logged at debug, because a missed notification must not take
    the daemon down (the watchdog would tell if it kept failing).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a busy PID 1 must not stall the event loop
            sock.sendto(payload, address)
    except OSError as exc:
        log.debug("sd_notify failed", states=list(states), error=str(exc))
        return False
    return True


def _one_line(text: str) -> str:
    """STATUS= is a single line in the protocol; a newline would start a new assignment."""
    return " ".join(text.split())


def ready(status: str) -> bool:
    """Tell systemd that start-up is complete (send only once the service really serves)."""
    return notify("READY=1", f"STATUS={_one_line(status)}")


def status(text: str) -> bool:
    """Set the line shown as `Status:` by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status: str) -> bool:
    """Tell systemd that shutdown (the drain) has begun."""
    return notify("STOPPING=1", f"STATUS={_one_line(status)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start or stop timeout fires (a long drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of `WatchdogSec=`, or None when it is off.

    None also when `WATCHDOG_PID` names another process: the variables were inherited
    (e.g. by a child) and the watchdog is not this process's business.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        timeout_usec = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if timeout_usec <= 0:
        return None
    return timeout_usec / 2_000_000


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog every `interval` seconds until cancelled.

    It runs on the event loop on purpose: when the loop is blocked the pings stop, and
    systemd aborts and restarts the service (case B22). A helper thread would keep pinging
    a hung daemon.
    """
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
