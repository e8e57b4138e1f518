"""C{twistd dfly-supernode}: options and service construction."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage
from twisted.web.server import Site

from dfly.config import (
    DEFAULT_API_PORT,
    DEFAULT_SUPERNODE_PORT,
    data_home,
    lock_home,
    parse_size,
    positive,
    write_ready_file,
)
from dfly.listening import ListeningService
from dfly.pieces import MIB, check_piece_size
from dfly.supernode.api import make_api
from dfly.supernode.scheduler import (
    DEFAULT_BLACKLIST_LIMIT,
    DEFAULT_CDN_LIMIT,
    DEFAULT_DOWN_LIMIT,
    DEFAULT_ISOLATION_LIMIT,
    DEFAULT_RELAY_DEPTH,
    DEFAULT_UP_LIMIT,
    Scheduler,
)
from dfly.supernode.service import Supernode
from dfly.wire.protocol import FramedFactory


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a dfly supernode: it fetches each file from its origin once, slices it, "
        "and schedules peers to fetch the pieces from each other."
    )
    optFlags = [
        ["no-relay", None, "Peers serve only pieces they hold (store and forward), not pieces still arriving."],
    ]
    optParameters = [
        ["port", "p", f"tcp:{DEFAULT_SUPERNODE_PORT}", "Endpoint for peers (control and slices)."],
        ["api", "a", f"tcp:{DEFAULT_API_PORT}:interface=127.0.0.1", "Endpoint for the HTTP API."],
        ["home", "d", data_home("supernode"), "Directory for the slice cache and metadata."],
        ["piece-size", None, "auto", "Piece size in MiB (1-15), or auto (by file size)."],
        ["cdn-limit", None, str(DEFAULT_CDN_LIMIT), "Peers per task the supernode serves at once (when no peer can)."],
        ["up-limit", None, str(DEFAULT_UP_LIMIT), "Concurrent uploads per peer."],
        ["down-limit", None, str(DEFAULT_DOWN_LIMIT), "Concurrent piece downloads per peer and task."],
        ["blacklist-limit", None, str(DEFAULT_BLACKLIST_LIMIT), "Failures in a row before a source peer is blacklisted."],
        ["isolation-limit", None, str(DEFAULT_ISOLATION_LIMIT), "Failures in a row before a downloader gets pieces from the supernode only."],
        ["relay-depth", None, str(DEFAULT_RELAY_DEPTH), "Relays in a row behind a peer before it may not pass a piece on while receiving it."],
        ["origin-timeout", None, "60", "Seconds of origin silence before a fetch fails."],
        ["revalidate-after", None, "5", "Seconds a cached file is trusted before the origin is asked again."],
        ["cache-limit", None, "0", "Evict idle cached files, least recently used first, above this size (0: never)."],
        ["origin-rate", None, "0", "Most bytes/s read from origins, all fetches together (K/M/G; 0: no limit)."],
        ["upload-rate", None, "0", "Most bytes/s of slices sent to peers, all connections together (0: no limit)."],
        ["idle-timeout", None, "60", "Seconds before a connection that shows no life is closed (peers ping every 20)."],
        ["origin-ca", None, None, "PEM bundle of CAs to verify HTTPS origins with (default: the system store)."],
        ["ready-file", None, None, "Write {\"port\": N, \"api\": M} as JSON here once listening."],
    ]

    def postOptions(self) -> None:
        if self["piece-size"] == "auto":
            self["piece-size"] = None
        else:
            try:
                self["piece-size"] = check_piece_size(int(self["piece-size"]) * MIB)
            except ValueError as e:
                raise usage.UsageError(f"--piece-size: {e}") from None
        for name in ("cdn-limit", "up-limit", "down-limit", "blacklist-limit", "isolation-limit", "relay-depth"):
            self[name] = int(positive(int, name, self[name]))
        self["origin-timeout"] = positive(float, "origin-timeout", self["origin-timeout"])
        self["idle-timeout"] = positive(float, "idle-timeout", self["idle-timeout"])
        self["cache-limit"] = parse_size(self["cache-limit"], "cache-limit")
        self["origin-rate"] = parse_size(self["origin-rate"], "origin-rate")
        self["upload-rate"] = parse_size(self["upload-rate"], "upload-rate")
        try:
            self["revalidate-after"] = float(self["revalidate-after"])
        except ValueError:
            raise usage.UsageError("--revalidate-after must be a number") from None
        self["home"] = os.path.abspath(self["home"])
        if self["origin-ca"] is not None:
            from dfly.tls import TrustStoreError, load_ca_bundle

            self["origin-ca"] = os.path.abspath(self["origin-ca"])
            try:
                load_ca_bundle(self["origin-ca"])
            except TrustStoreError as e:
                raise usage.UsageError(f"--origin-ca: {e}") from None


def make_http_client(reactor: Any, ca_file: str | None = None) -> Any:
    """The origin client: pooled connections, redirects followed, bytes untouched, HTTPS verified."""
    from dfly.httpclient import OriginClient

    return OriginClient(reactor, ca_file=ca_file)


class SupernodeService(ListeningService):
    """Listens for peers and for the API, then reports the ports it got."""

    role = "dfly-supernode"

    def __init__(self, reactor: Any, config: Options, node: Supernode) -> None:
        super().__init__(reactor)
        self._config = config
        self.node = node

    def listeners(self) -> list[tuple[str, Any]]:
        idle = self._config["idle-timeout"]
        return [
            (
                self._config["port"],
                FramedFactory(
                    self.node.make_session, idle_timeout=idle, clock=self._reactor, upload=self.node.upload_bucket
                ),
            ),
            (self._config["api"], Site(make_api(self.node), timeout=idle)),
        ]

    def listening(self, ports: list[Any]) -> None:
        info = {"port": ports[0].getHost().port, "api": ports[1].getHost().port}
        self._log.info("supernode listening: peers on port {port}, API on port {api}", **info)
        write_ready_file(self._config["ready-file"], {**info, "pid": os.getpid()})


def makeService(config: Options, reactor: Any = None, http: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    lock = lock_home(config["home"], "dfly-supernode")
    scheduler = Scheduler(
        down_limit=config["down-limit"],
        up_limit=config["up-limit"],
        cdn_limit=config["cdn-limit"],
        blacklist_limit=config["blacklist-limit"],
        isolation_limit=config["isolation-limit"],
        relay=not config["no-relay"],
        relay_depth=config["relay-depth"],
    )
    node = Supernode(
        reactor,
        http or make_http_client(reactor, config["origin-ca"]),
        config["home"],
        scheduler,
        piece_size=config["piece-size"],
        origin_idle_timeout=config["origin-timeout"],
        revalidate_after=config["revalidate-after"],
        cache_limit=config["cache-limit"],
        origin_rate=config["origin-rate"],
        upload_rate=config["upload-rate"],
    )
    service = SupernodeService(reactor, config, node)
    service.lock = lock  # type: ignore[attr-defined]
    return service
