"""C{twistd dfly-peer}: options and service construction."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.python import usage

from dfly.config import (
    DEFAULT_PEER_PORT,
    data_home,
    lock_home,
    parse_hostport,
    parse_size,
    positive,
    write_ready_file,
)
from dfly.listening import ListeningService
from dfly.peer.localapi import LocalApiSession
from dfly.peer.node import PeerNode
from dfly.wire.protocol import FramedFactory, FramedProtocol
from dfly.wire.serve import SliceServerSession


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a dfly peer daemon: it downloads files through the swarm for dfget and "
        "shares the pieces it holds with other peers."
    )
    optParameters = [
        ["port", "p", f"tcp:{DEFAULT_PEER_PORT}", "Endpoint of the upload server other peers fetch from."],
        ["home", "d", data_home("peer"), "Directory for pieces and the local API socket."],
        ["advertise-host", None, None, "Address other peers should use (default: as the supernode sees us)."],
        ["expire", None, "600", "Seconds a finished file stays shared after its last use."],
        ["stall-timeout", None, "30", "Seconds without bytes before a source is given up."],
        ["idle-timeout", None, "60", "Seconds before an upload connection that shows no life is closed."],
        ["min-rate", None, "256K", "Slowest a source may send a piece (bytes/s) before it is given up."],
        ["upload-rate", None, "0", "Most bytes/s sent to other peers, all connections together (K/M/G; 0: no limit)."],
        ["download-rate", None, "0", "Most bytes/s received from sources, all downloads together (K/M/G; 0: no limit)."],
        ["cache-limit", None, "0", "Drop finished files, least recently used first, above this size (0: no limit)."],
        ["link-timeout", None, "30", "Seconds without any supernode before unfinished downloads fail."],
        ["keepalive", None, "20", "Seconds between pings on the supernode link (3 missed: reconnect)."],
        ["ready-file", None, None, "Write {\"port\": N, \"socket\": PATH} as JSON here once listening."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["supernode"] = []

    def opt_supernode(self, value: str) -> None:
        """Supernode HOST:PORT (repeatable; tried in order). Default 127.0.0.1:8002."""
        self["supernode"].append(parse_hostport(value))

    def postOptions(self) -> None:
        if not self["supernode"]:
            self["supernode"] = [("127.0.0.1", 8002)]
        self["expire"] = positive(float, "expire", self["expire"])
        self["stall-timeout"] = positive(float, "stall-timeout", self["stall-timeout"])
        self["idle-timeout"] = positive(float, "idle-timeout", self["idle-timeout"])
        self["keepalive"] = positive(float, "keepalive", self["keepalive"])
        self["link-timeout"] = positive(float, "link-timeout", self["link-timeout"])
        self["cache-limit"] = parse_size(self["cache-limit"], "cache-limit")
        self["min-rate"] = parse_size(self["min-rate"], "min-rate")
        self["upload-rate"] = parse_size(self["upload-rate"], "upload-rate")
        self["download-rate"] = parse_size(self["download-rate"], "download-rate")
        if self["min-rate"] <= 0:
            raise usage.UsageError("--min-rate must be positive")
        self["home"] = os.path.abspath(self["home"])


def socket_path(home: str) -> str:
    """Where the local API listens, for a daemon whose home is C{home}."""
    return os.path.join(home, "dfly.sock")


class PeerService(ListeningService):
    """Starts the upload server, the local API and the node, in that order."""

    role = "dfly-peer"

    def __init__(self, reactor: Any, config: Options) -> None:
        super().__init__(reactor)
        self._config = config
        self.node: PeerNode | None = None

    def listeners(self) -> list[tuple[str, Any]]:
        reactor, config = self._reactor, self._config
        # Before anything touches the home: a second daemon must not wipe the first one's files.
        self._lock = lock_home(config["home"], "dfly-peer")
        node = self.node = PeerNode(
            reactor,
            config["home"],
            config["supernode"],
            advertise_host=config["advertise-host"],
            expire=config["expire"],
            stall_timeout=config["stall-timeout"],
            keepalive=config["keepalive"],
            link_timeout=config["link-timeout"],
            cache_limit=config["cache-limit"],
            min_rate=config["min-rate"],
            upload_rate=config["upload-rate"],
            download_rate=config["download-rate"],
        )
        sock = socket_path(config["home"])
        if os.path.exists(sock):
            os.unlink(sock)

        def upload_session(wire: FramedProtocol) -> SliceServerSession:
            return SliceServerSession(wire, node.lookup)

        def api_session(wire: FramedProtocol) -> LocalApiSession:
            return LocalApiSession(wire, node)

        return [
            (
                config["port"],
                FramedFactory(
                    upload_session, idle_timeout=config["idle-timeout"], clock=reactor, upload=node.upload_bucket
                ),
            ),
            (f"unix:{sock}:mode=600", FramedFactory(api_session)),
        ]

    def listening(self, ports: list[Any]) -> None:
        assert self.node is not None
        node, config = self.node, self._config
        port = ports[0].getHost().port
        sock = socket_path(config["home"])
        self._log.info(
            "peer {peer_id} uploading on port {port}, local API at {sock}", peer_id=node.peer_id, port=port, sock=sock
        )
        node.start(port)
        write_ready_file(config["ready-file"], {"port": port, "socket": sock, "pid": os.getpid(), "peer": node.peer_id})

    def stopService(self) -> Deferred[Any]:
        if self.node is not None:
            self.node.stop()
        return super().stopService()


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return PeerService(reactor, config)
