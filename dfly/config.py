"""Defaults and option parsing shared by the twistd plugins and dfget."""

from __future__ import annotations

import os
import re
from typing import Any


def usage_error(message: str) -> Any:
    """A C{twisted.python.usage.UsageError} (imported only when one is raised, so that a
    command that needs no reactor, such as dfget handing a download to a daemon, never
    loads Twisted)."""
    from twisted.python import usage

    return usage.UsageError(message)


DEFAULT_SUPERNODE_PORT = 8002
DEFAULT_API_PORT = 8001
DEFAULT_PEER_PORT = 15001


def socket_path(home: str) -> str:
    """Where a peer daemon's local API listens, for a daemon whose home is C{home}."""
    return os.path.join(home, "dfly.sock")


def data_home(role: str) -> str:
    """Default state directory for C{role}: $XDG_DATA_HOME/dfly/ROLE (~/.local/share/...)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "dfly", role)


_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-_]+)(?::(\d{1,5}))?$")


def parse_hostport(text: str, default_port: int = DEFAULT_SUPERNODE_PORT) -> tuple[str, int]:
    """Parse C{HOST[:PORT]}; raises C{usage.UsageError} with a clear message."""
    m = _HOSTPORT.match(text.strip())
    if not m:
        raise usage_error(f"expected HOST:PORT, got {text!r}")
    host = m.group(1).strip("[]")
    port = int(m.group(2)) if m.group(2) else default_port
    if not 0 < port < 65536:
        raise usage_error(f"port out of range in {text!r}")
    return host, port


def positive(kind: type, name: str, text: str) -> float:
    """Parse a positive number option, raising C{usage.UsageError} otherwise."""
    try:
        value = kind(text)
    except ValueError:
        raise usage_error(f"--{name} must be a number, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise usage_error(f"--{name} must be a positive, finite number")
    return float(value)


def write_ready_file(path: str | None, info: dict[str, object]) -> None:
    """Atomically write C{info} as JSON to C{path} (if given): tells scripts we listen."""
    if not path:
        return
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def parse_size(text: str, name: str = "size") -> int:
    """Bytes from C{"512K"}, C{"64M"}, C{"10G"}, C{"1T"} or a plain number (0 allowed)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise usage_error(f"--{name}: expected a size like 512M or 10G, not {text!r}") from None
    if value < 0:
        raise usage_error(f"--{name} must not be negative")
    return int(value)


def lock_home(home: str, role: str) -> object:
    """Hold an exclusive lock on C{home} for this process; raise SystemExit if another has it.

    The returned file must stay open for as long as the lock is to be held.
    """
    import fcntl

    os.makedirs(home, exist_ok=True)
    f = open(os.path.join(home, "lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SystemExit(f"another {role} is already using {home}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def stop_with_error(reactor: object, message: str) -> None:
    """Stop the reactor (now or once it runs) and make the process exit with status 1."""
    import sys

    sys.stderr.write(f"{message}\n")

    def stop() -> None:
        r: object = reactor
        r.addSystemEventTrigger("after", "shutdown", os._exit, 1)  # type: ignore[attr-defined]
        r.stop()  # type: ignore[attr-defined]

    if getattr(reactor, "running", False):
        stop()
    else:
        reactor.callWhenRunning(stop)  # type: ignore[attr-defined]
