"""Waiting for a condition in the real-process tests, bounded in time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dfly.devtools.swarm import SwarmError


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll C{check} every 50 ms until it returns something true, for at most C{timeout} s
    (a swarm that cannot answer yet counts as not yet); its last value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except SwarmError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
