"""A real L{PeerNode} on a L{MemoryReactorClock} with a hand-driven supernode link and source.

The supernode link is a L{StringTransport} the test reads frames from
(L{Peer.sent}) and writes frames to (L{Peer.control}); the one source is a
L{FetchSession} on another transport, answered by the test with slices
(L{Peer.deliver}).  The whole-file hasher runs inline (L{sync_hash}).
"""

from __future__ import annotations

import hashlib
from typing import Any

from memhelpers import FrameCollector, pieces_of
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from dfly.peer.fetch import FetchSession
from dfly.peer.link import LinkSession
from dfly.peer.node import DownloadRequest, DownloadResult, PeerNode, hash_range
from dfly.pieces import MIB, wrap
from dfly.wire.framing import encode_control
from dfly.wire.protocol import FramedProtocol

P = 1 * MIB
SOURCE = ("source.example", 15001)


def sync_hash(path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
    """The node's whole-file hasher, run inline (a memory reactor has no thread pool)."""
    try:
        hash_range(path, offset, length, md5)
    except Exception:
        return fail()
    return succeed(None)


class Peer:
    """A peer node with a hand-driven supernode link and one hand-driven source."""

    def __init__(self, root: Any) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000.0)
        self.node = PeerNode(self.clock, str(root / "peer"), [("127.0.0.1", 8002)], peer_id="p", hasher=sync_hash)
        self.link_transport = StringTransport()
        self.link = FramedProtocol(lambda wire: LinkSession(wire, self.node.link))
        self.link.makeConnection(self.link_transport)
        assert isinstance(self.link.session, LinkSession)
        self.node.link.session = self.link.session
        self.node.link.address = ("127.0.0.1", 8002)
        self.source_transport = StringTransport()
        self.source = FramedProtocol(lambda wire: FetchSession(wire, self.node.sources, SOURCE))
        self.source.makeConnection(self.source_transport)
        assert isinstance(self.source.session, FetchSession)
        self.node.sources._sessions[SOURCE] = self.source.session
        self._read = 0

    def control(self, msg: dict[str, Any]) -> None:
        self.link.dataReceived(encode_control(msg))

    def sent(self) -> list[dict[str, Any]]:
        """Control messages the node sent to the supernode since the last call."""
        data = self.link_transport.value()
        collector = FrameCollector().feed(data[self._read :])
        self._read = len(data)
        return [m for kind, m in collector.events if kind == "control"]

    def info(self, content: bytes, generation: str, fresh_ms: int, **extra: Any) -> dict[str, Any]:
        return {
            "state": "done", "generation": generation, "fresh_ms": fresh_ms, "length": len(content),
            "piece_size": P, "piece_count": len(pieces_of(content, P)),
            "md5": hashlib.md5(content).hexdigest(), **extra,
        }

    def deliver(self, tid: str, content: bytes) -> None:
        """Assign every piece of C{content} from the source and answer each with its slice."""
        for info in pieces_of(content, P):
            self.control({
                "op": "assign", "task": tid, "piece": info.piece, "len": info.data_len, "piece_size": P,
                "md5": info.md5, "source": {"id": "s", "host": SOURCE[0], "port": SOURCE[1]},
            })
        for info in pieces_of(content, P):
            self.source.dataReceived(
                encode_control({"op": "slice", "task": tid, "piece": info.piece, "len": info.data_len, "piece_size": P})
                + wrap(info.data, P)
            )

    def finish(self, request: DownloadRequest, content: bytes, generation: str = "g1", fresh_ms: int = 5000) -> DownloadResult:
        """Download C{request} to the end: registered, every piece delivered, verified."""
        out: list[Any] = []
        self.node.download(request).addBoth(out.append)
        (reg,) = [m for m in self.sent() if m["op"] == "register"]
        self.control({"op": "registered", "req": reg["req"], "task": request.task_id, **self.info(content, generation, fresh_ms)})
        self.deliver(request.task_id, content)
        assert len(out) == 1 and isinstance(out[0], DownloadResult), out
        self.sent()
        return out[0]

    def close(self) -> None:
        self.node.stop()
