"""dfget's own download from the origin (L{dfget.back_source}) against small real servers
on loopback, with the real reactor: silence before and after the headers."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred

from dfly import dfget
from dfly.errors import DownloadTimeout


def serve(answer: bytes | None) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that reads each request and sends C{answer} (None: nothing),
    then keeps the connection open and silent."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn = sock.accept()[0]
            except OSError:
                continue
            conns.append(conn)
            conn.settimeout(5)
            try:
                conn.recv(65536)
                if answer is not None:
                    conn.sendall(answer)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        sock.close()


@pytest.fixture
def silent_origin() -> Iterator[int]:
    """Accepts, reads the request, never answers."""
    yield from serve(None)


@pytest.fixture
def stalled_origin() -> Iterator[int]:
    """Answers 200 with a Content-Length and part of the body, then sends nothing more."""
    yield from serve(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)


async def fetch(tmp_path: Any, port: int) -> BaseException:
    """The error L{dfget.back_source} fails with (within 10 s) when fetching from C{port}."""
    from twisted.internet import reactor

    d = ensureDeferred(_fetch(reactor, tmp_path, port))
    d.addTimeout(10, reactor)
    return await d


async def _fetch(reactor: Any, tmp_path: Any, port: int) -> BaseException:
    out_path = os.path.join(str(tmp_path), "f.out")
    opts = dfget.Options()
    opts.parseOptions([f"http://127.0.0.1:{port}/f.bin", "-o", out_path, "-q"])
    out = dfget.Output(out_path)
    try:
        await dfget.back_source(reactor, opts, out, dfget.Reporter(open(os.devnull, "w"), False))
    except Exception as e:
        return e
    finally:
        out.discard()
    raise AssertionError("the download did not fail")


@pytest_twisted.ensureDeferred
async def test_silent_origin_is_a_timeout(tmp_path: Any, silent_origin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin that never answers the request is given up after dfget's idle time, as a
    timeout (exit 5) that says the origin sent nothing for that long."""
    monkeypatch.setattr(dfget, "BACK_SOURCE_IDLE", 0.5)
    error = await fetch(tmp_path, silent_origin)
    assert isinstance(error, DownloadTimeout), repr(error)
    assert str(error) == "origin sent nothing for 0.5 s"
    assert dfget.exit_code(error) == dfget.EXIT_TIMEOUT
    assert os.listdir(str(tmp_path)) == []


@pytest_twisted.ensureDeferred
async def test_origin_stalled_mid_body_is_a_timeout(tmp_path: Any, stalled_origin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin that stops sending mid-body for dfget's idle time: a timeout (exit 5) too."""
    monkeypatch.setattr(dfget, "BACK_SOURCE_IDLE", 0.5)
    error = await fetch(tmp_path, stalled_origin)
    assert isinstance(error, DownloadTimeout), repr(error)
    assert str(error) == "origin sent nothing for 0.5 s"
    assert dfget.exit_code(error) == dfget.EXIT_TIMEOUT
    assert os.listdir(str(tmp_path)) == []
