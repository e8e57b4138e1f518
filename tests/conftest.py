"""Shared fixtures.  Loopback fixtures start real processes and always stop them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dfly.devtools.swarm import Swarm


@pytest.fixture
def swarm(tmp_path: object) -> Iterator[Swarm]:
    """A loopback swarm under the test's temporary directory, stopped at teardown."""
    s = Swarm(os.path.join(str(tmp_path), "swarm"))
    try:
        yield s
    finally:
        codes = s.close()
        # A daemon that died on its own (rather than by our SIGTERM) is a bug worth seeing.
        crashed = {name: code for name, code in codes.items() if code not in (0, -15, None)}
        if crashed and not name_is_expected(crashed):
            for proc_name in crashed:
                print(Swarm.tail(os.path.join(s.root, f"{proc_name}.log")))
            pytest.fail(f"processes exited abnormally: {crashed}")


def name_is_expected(crashed: dict[str, int | None]) -> bool:
    """Processes a test killed on purpose are named 'killed-*'."""
    return all(name.startswith("killed-") for name in crashed)


@pytest.fixture
def files(tmp_path: object) -> str:
    """A directory for origin content."""
    path = os.path.join(str(tmp_path), "files")
    os.makedirs(path)
    return path
