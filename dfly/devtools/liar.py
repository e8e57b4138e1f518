"""A Byzantine peer for tests: it claims pieces it never fetched and serves bad slices.

The liar speaks the dfly protocol with plain sockets and threads (no reactor),
so nothing in it shares code paths with the honest peer beyond the frame and
slice-header encoders.  It listens for slice requests, says C{hello} to the
supernode, registers the task for a URL, and then lies: every C{assign} it
receives is answered at once with C{done}, so the scheduler believes it holds
the piece and makes it a source for others.  Asked for a slice, it answers a
C{slice} frame followed by, depending on C{--mode}:

* C{lie}: a slice with a correct header and tail but wrong data;
* C{garbage}: random bytes of the slice's length (header included);
* C{truncate}: a correct header and half the (wrong) data, then it closes;
* C{slow}: a correct header, wrong data paced at C{--rate} bytes/s, the tail.

It runs for at most C{--seconds}, stops on SIGTERM or SIGINT, and prints what
it did on stdout: one line per event, and at the end a line
C{liar ID: summary {...}} counting C{assigned}, C{claimed} (done reported
without a fetch), C{gets}, C{served} (bad slices begun), C{completed} (bad
slices sent whole) and C{nacks}.

    python -m dfly.devtools.liar --supernode HOST:PORT --url URL [--mode lie|garbage|truncate|slow]
        [--seconds 120] [--ready-file F] [--peer-id ID] [--rate BYTES] [--have RANGES]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dfly.config import write_ready_file
from dfly.errors import ProtocolError
from dfly.pieces import TAIL, Layout, SliceHeader
from dfly.wire.framing import MAX_CONTROL, decode_control, encode_control

MODES = ("lie", "garbage", "truncate", "slow")
CHUNK = 64 * 1024
POLL = 0.2  # seconds between checks of the stop flag while blocked on a socket
PING_EVERY = 20.0  # the supernode closes control connections that show no life
PATTERN = b"dfly-liar-wrong-bytes:"


class Closed(ConnectionError):
    """The other side closed the connection (or broke the framing)."""


class FrameReader:
    """Reads control frames from a blocking socket, giving up when C{stop} is set."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.buf = bytearray()
        sock.settimeout(POLL)

    def _fill(self, need: int) -> bool:
        while len(self.buf) < need:
            if self.stop.is_set():
                return False
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise Closed(str(e)) from None
            if not data:
                raise Closed("connection closed")
            self.buf += data
        return True

    def read(self) -> dict[str, Any] | None:
        """The next control frame, or None once C{stop} is set."""
        if not self._fill(4):
            return None
        (length,) = struct.unpack("!I", self.buf[:4])
        if not 0 < length <= MAX_CONTROL:
            raise Closed(f"bad control frame length {length}")
        if not self._fill(4 + length):
            return None
        body = bytes(self.buf[4 : 4 + length])
        del self.buf[: 4 + length]
        try:
            return decode_control(body)
        except ProtocolError as e:
            raise Closed(str(e)) from None


@dataclass
class PieceInfo:
    piece_size: int
    data_len: int


class Liar:
    """One lying peer: a control connection to the supernode and an upload server."""

    def __init__(
        self,
        supernode: tuple[str, int],
        url: str,
        mode: str = "lie",
        seconds: float = 120.0,
        peer_id: str | None = None,
        rate: float = 256 * 1024,
        have: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.supernode = supernode
        self.url = url
        self.mode = mode
        self.deadline = time.monotonic() + seconds
        self.peer_id = peer_id or f"liar-{mode}-{uuid.uuid4().hex[:8]}"
        self.rate = rate
        self.have = have
        self.host = host
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._control_lock = threading.Lock()  # the control and main threads both write
        self._pieces: dict[tuple[str, int], PieceInfo] = {}
        self._layouts: dict[str, Layout] = {}
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self.listener = socket.create_server((host, port))
        self.listener.settimeout(POLL)
        self.port: int = self.listener.getsockname()[1]
        self.control: socket.socket | None = None
        self.registered = threading.Event()
        self.task_id: str | None = None

    # -- output ----------------------------------------------------------------
    def say(self, text: str) -> None:
        print(f"liar {self.peer_id}: {text}", flush=True)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    # -- the supernode side ------------------------------------------------------
    def connect(self) -> None:
        """Say hello and register the task; returns once the hello is sent."""
        sock = socket.create_connection(self.supernode, timeout=10)
        self.control = sock
        self._send_control({"op": "hello", "peer": self.peer_id, "port": self.port, "host": self.host})
        self._send_control(
            {
                "op": "register",
                "req": 1,
                "url": self.url,
                "filter": [],
                "headers": [],
                "md5": None,
                "identifier": None,
                "have": self.have,
                "generation": None,
            },
        )
        self.say(f"hello sent to {self.supernode[0]}:{self.supernode[1]}, serving on port {self.port}")

    def run_control(self) -> None:
        """Read the supernode's frames until the deadline or a stop; lie about every assign."""
        assert self.control is not None
        reader = FrameReader(self.control, self.stop)
        while not self.stop.is_set():
            try:
                msg = reader.read()
                if msg is None:
                    break
                self._on_control(msg)
            except OSError as e:  # Closed included
                if not self.stop.is_set():
                    self.say(f"supernode connection ended: {e}")
                break

    def _on_control(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op in ("registered", "task_info"):
            self._task_info(msg)
            if op == "registered":
                self.task_id = str(msg.get("task"))
                self.say(f"registered task {self.task_id} ({msg.get('state')})")
                self.registered.set()
        elif op == "assign":
            self._assign(msg)
        elif op == "refused":
            self.say(f"registration refused: {msg.get('reason')}")
            self.registered.set()
            self.stop.set()
        elif op in ("task_failed", "task_reset", "welcome"):
            self.say(f"supernode says {op}")

    def _task_info(self, msg: dict[str, Any]) -> None:
        task, length, piece_size = msg.get("task"), msg.get("length"), msg.get("piece_size")
        if isinstance(task, str) and isinstance(length, int) and isinstance(piece_size, int):
            with self._lock:
                self._layouts[task] = Layout(length, piece_size)

    def _assign(self, msg: dict[str, Any]) -> None:
        assert self.control is not None
        task, piece, source = msg["task"], int(msg["piece"]), msg["source"]
        source_id = source if source == "cdn" else str(source["id"])
        with self._lock:
            self._pieces[(task, piece)] = PieceInfo(int(msg["piece_size"]), int(msg["len"]))
        self.count("assigned")
        # The lie: claim the piece at once without fetching a byte of it.
        self._send_control({"op": "done", "task": task, "piece": piece, "source": source_id})
        self.count("claimed")
        self.say(f"claimed piece {piece} (assigned from {source_id}) without fetching it")

    # -- the upload side -----------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept slice requests until stopped; one thread per connection."""
        while not self.stop.is_set():
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, who: str) -> None:
        reader = FrameReader(conn, self.stop)
        try:
            while not self.stop.is_set():
                msg = reader.read()
                if msg is None:
                    break
                if msg.get("op") != "get":
                    self.say(f"{who} sent {msg.get('op')!r}; closing")
                    break
                if not self._answer(conn, who, str(msg.get("task")), int(msg.get("piece", -1))):
                    break
        except OSError as e:  # Closed included
            self.say(f"connection from {who} ended: {e}")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _info(self, task: str, piece: int) -> PieceInfo | None:
        with self._lock:
            info = self._pieces.get((task, piece))
            layout = self._layouts.get(task)
        if info is None and layout is not None and 0 <= piece < layout.count:
            info = PieceInfo(layout.piece_size, layout.data_len(piece))
        return info

    def _answer(self, conn: socket.socket, who: str, task: str, piece: int) -> bool:
        """Answer one C{get} in the liar's mode; False when the connection must end."""
        self.count("gets")
        info = self._info(task, piece)
        if info is None:
            self._send(conn, {"op": "nack", "task": task, "piece": piece, "reason": "no such piece"})
            self.count("nacks")
            return True
        self._send(
            conn,
            {"op": "slice", "task": task, "piece": piece, "len": info.data_len, "piece_size": info.piece_size},
        )
        header = SliceHeader(info.data_len, info.piece_size).encode()
        # Counted once the bad slice is under way: a receiver that spots the lie early
        # aborts the connection before the rest is sent.
        self.count("served")
        self.say(f"serving a {self.mode} slice of piece {piece} ({info.data_len} bytes) to {who}")
        if self.mode == "garbage":
            self._stream(conn, os.urandom(info.data_len + len(header) + len(TAIL)))
        elif self.mode == "truncate":
            self._write(conn, header)
            self._stream(conn, wrong_bytes(info.data_len // 2))
            conn.shutdown(socket.SHUT_RDWR)
            return False
        else:
            self._write(conn, header)
            self._stream(conn, wrong_bytes(info.data_len), self.rate if self.mode == "slow" else None)
            self._write(conn, TAIL)
        self.count("completed")
        return True

    def _stream(self, conn: socket.socket, data: bytes, rate: float | None = None) -> None:
        """Send C{data}, paced to C{rate} bytes per second if given."""
        start = time.monotonic()
        view = memoryview(data)
        sent = 0
        chunk = max(1, min(CHUNK, int(rate / 10))) if rate else CHUNK
        while sent < len(view):
            if self.stop.is_set():
                raise Closed("stopping")
            self._write(conn, view[sent : sent + chunk])
            sent += min(chunk, len(view) - sent)
            if rate:
                ahead = start + sent / rate - time.monotonic()
                if ahead > 0:
                    self.stop.wait(ahead)

    # -- plumbing --------------------------------------------------------------------
    def _send(self, sock: socket.socket, msg: dict[str, Any]) -> None:
        self._write(sock, encode_control(msg))

    def _send_control(self, msg: dict[str, Any]) -> None:
        assert self.control is not None
        with self._control_lock:
            self._send(self.control, msg)

    def _write(self, sock: socket.socket, data: bytes | memoryview) -> None:
        """Send all of C{data}, however long the receiver takes to read, until stopped.

        Sockets have a short timeout (so that reads notice a stop); a slow reader must
        not look like a closed connection, so a send that times out is simply retried.
        """
        view = memoryview(data)
        while view:
            if self.stop.is_set():
                raise Closed("stopping")
            try:
                n = sock.send(view)
            except TimeoutError:
                continue
            view = view[n:]

    def run(self, ready_file: str | None = None) -> None:
        """Connect, serve and lie until the deadline or a stop, then clean up."""
        server = threading.Thread(target=self.serve_forever, daemon=True)
        server.start()
        self.connect()
        control = threading.Thread(target=self.run_control, daemon=True)
        control.start()
        if not self.registered.wait(max(0.0, self.deadline - time.monotonic())):
            self.say("no answer to the registration")
        if ready_file and not self.stop.is_set():
            write_ready_file(ready_file, {"port": self.port, "peer": self.peer_id, "pid": os.getpid(), "task": self.task_id})
        next_ping = time.monotonic() + PING_EVERY
        while not self.stop.is_set() and time.monotonic() < self.deadline and control.is_alive():
            self.stop.wait(min(POLL, max(0.0, self.deadline - time.monotonic())))
            if time.monotonic() >= next_ping:
                next_ping += PING_EVERY
                try:
                    self._send_control({"op": "ping"})
                except OSError:
                    break
        self.stop.set()
        # Every thread notices the stop within POLL seconds (or when a send fails).
        for t in [control, server, *self._threads]:
            t.join(2)
        self.close()

    def close(self) -> None:
        """Stop, close every socket and print the summary."""
        self.stop.set()
        for sock in [self.listener, self.control, *self._snapshot_conns()]:
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self.say("summary " + json.dumps(dict(sorted(self.counts.items()))))

    def _snapshot_conns(self) -> list[socket.socket]:
        with self._lock:
            return list(self._conns)


def wrong_bytes(n: int) -> bytes:
    """C{n} bytes that are certainly not the real content of a random test file."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dfly.devtools.liar",
        description="A Byzantine dfly peer: claims every piece it is assigned and serves bad slices.",
    )
    p.add_argument("--supernode", required=True, type=parse_hostport, metavar="HOST:PORT")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=MODES, default="lie")
    p.add_argument("--seconds", type=float, default=120.0, help="stop after this long (default 120)")
    p.add_argument("--ready-file", help="write {port, peer, pid, task} as JSON here once registered")
    p.add_argument("--peer-id", help="peer id to claim (default liar-MODE-random)")
    p.add_argument("--rate", type=float, default=256 * 1024, help="bytes/s in slow mode (default 256 KiB/s)")
    p.add_argument("--have", default="", help="pieces to claim at registration, e.g. 0-9")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on and advertise")
    p.add_argument("--port", type=int, default=0, help="port for slice requests (default any)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0:
        p.error("--seconds and --rate must be positive")
    liar = Liar(
        args.supernode, args.url, args.mode, args.seconds, args.peer_id, args.rate, args.have, args.host, args.port
    )

    def stop(signum: int, frame: Any) -> None:
        liar.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        liar.run(args.ready_file)
    except OSError as e:
        liar.close()
        print(f"liar: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
