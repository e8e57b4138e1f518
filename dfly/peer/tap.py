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
    socket_path,
    write_ready_file,
)
from dfly.errors import DflyError
from dfly.listening import ListeningService
from dfly.peer.localapi import LocalApiSession
from dfly.peer.node import PeerNode
from dfly.proxy.routes import DEFAULT_FILTER_PARAMS, P2PRules, check_registry, parse_allowed
from dfly.wire.protocol import FramedFactory, FramedProtocol
from dfly.wire.serve import SliceServerSession

DEFAULT_PROXY = "tcp:65001:interface=127.0.0.1"


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
        ["proxy", None, DEFAULT_PROXY,
         "Endpoint of the HTTP proxy (registry mirror and forward proxy) container runtimes pull through; "
         "'none' turns it off."],
        ["registry", None, None,
         "Upstream registry URL of mirror requests (https://registry.example); containerd's ?ns= may name others."],
        ["fallback-after", None, "5",
         "Seconds the swarm may take to start a response before the proxy fetches straight from the registry."],
        ["upstream-timeout", None, "60", "Seconds the proxy waits for an upstream's response headers (then 504)."],
        ["upstream-ca", None, None,
         "PEM bundle of CAs the proxy verifies HTTPS upstreams with (default: the system store)."],
        ["ca-dir", None, None,
         "Directory of the CA (ca.pem, ca.key) that signs certificates of hijacked hosts (default: the home); "
         "created on first use."],
        ["connect-ports", None, "443",
         "Ports CONNECT may tunnel to, comma-separated, or 'any'; hijacked hosts may use any port."],
        ["connect-timeout", None, "30", "Seconds to reach a CONNECT target before answering 502."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["supernode"] = []
        self["registry-allow"] = []
        self["p2p-rule"] = []
        self["filter-param"] = list(DEFAULT_FILTER_PARAMS)
        self["hijack"] = []

    def opt_hijack(self, value: str) -> None:
        """Regex (searched in HOST:PORT and HOST, repeatable) of CONNECT targets to intercept; others are tunnelled."""
        import re

        try:
            re.compile(value)
        except re.error as e:
            raise usage.UsageError(f"--hijack {value!r}: {e}") from None
        self["hijack"].append(value)

    def opt_registry_allow(self, value: str) -> None:
        """Registry a mirror request may name with ?ns=HOST (repeatable): HOST[:PORT] means https, http://HOST[:PORT] plain http."""
        try:
            parse_allowed([value])
        except DflyError as e:
            raise usage.UsageError(str(e)) from None
        self["registry-allow"].append(value)

    def opt_p2p_rule(self, value: str) -> None:
        """Regex (searched in the URL) of other files a GET fetches through the swarm (repeatable); registry blobs always do."""
        try:
            P2PRules([value])
        except DflyError as e:
            raise usage.UsageError(str(e)) from None
        self["p2p-rule"].append(value)

    def opt_filter_param(self, value: str) -> None:
        """Query parameter left out of --p2p-rule files' identity (repeatable; adds to the S3/GCS/Azure signature defaults; 'none' clears)."""
        if value == "none":
            self["filter-param"] = []
        else:
            self["filter-param"].append(value)

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
        self["fallback-after"] = positive(float, "fallback-after", self["fallback-after"])
        self["upstream-timeout"] = positive(float, "upstream-timeout", self["upstream-timeout"])
        if self["proxy"] in ("none", "off", ""):
            self["proxy"] = None
        self["connect-timeout"] = positive(float, "connect-timeout", self["connect-timeout"])
        self["connect-ports"] = parse_ports(self["connect-ports"])
        self["ca-dir"] = os.path.abspath(self["ca-dir"] or self["home"])
        if self["upstream-ca"] is not None:
            from dfly.tls import load_ca_bundle

            self["upstream-ca"] = os.path.abspath(self["upstream-ca"])
            try:
                load_ca_bundle(self["upstream-ca"])
            except DflyError as e:
                raise usage.UsageError(f"--upstream-ca: {e}") from None
        if self["registry"] is not None:
            try:
                self["registry"] = check_registry(self["registry"])
            except DflyError as e:
                raise usage.UsageError(str(e)) from None


def parse_ports(text: str) -> frozenset[int] | None:
    """C{--connect-ports}: C{"443,8443"} or C{"any"} (None)."""
    if text.strip().lower() == "any":
        return None
    try:
        ports = frozenset(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise usage.UsageError(f"--connect-ports must be port numbers or 'any', not {text!r}") from None
    if not all(0 < p < 65536 for p in ports):
        raise usage.UsageError(f"--connect-ports out of range: {text!r}")
    return ports


def make_upstream_agent(reactor: Any, context_factory: Any) -> Any:
    """The proxy's upstream client (an C{IAgent}): pooled, persistent connections; TLS per
    C{context_factory} (an C{IPolicyForHTTPS})."""
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    return Agent(reactor, contextFactory=context_factory, pool=pool, connectTimeout=30)


class PeerService(ListeningService):
    """Starts the upload server, the local API and the node, in that order."""

    role = "dfly-peer"

    def __init__(self, reactor: Any, config: Options) -> None:
        super().__init__(reactor)
        self._config = config
        self.node: PeerNode | None = None
        self.proxy: Any = None  # the ProxyResource, when the proxy is on

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
            return node.upload_session(wire)

        def api_session(wire: FramedProtocol) -> LocalApiSession:
            return LocalApiSession(wire, node)

        listeners: list[tuple[str, Any]] = [
            (
                config["port"],
                FramedFactory(
                    upload_session, idle_timeout=config["idle-timeout"], clock=reactor, upload=node.upload_bucket
                ),
            ),
            (f"unix:{sock}:mode=600", FramedFactory(api_session)),
        ]
        if config["proxy"]:
            self.proxy = self.make_proxy(node)
            listeners.append((config["proxy"], self.make_proxy_site(self.proxy)))
        return listeners

    def make_proxy_site(self, resource: Any) -> Any:
        """The proxy's site: the resource, plus CONNECT tunnels and hijacks signed by the CA.

        (Imported here: dfget reads this module for L{socket_path} and must start fast.)"""
        from dfly.proxy.ca import CertificateAuthority, ensure_ca
        from dfly.proxy.connect import ConnectRules, ProxySite

        config = self._config
        authority = None
        if config["hijack"]:
            try:
                cert_path, created = ensure_ca(config["ca-dir"])
                authority = CertificateAuthority.from_directory(config["ca-dir"])
            except (DflyError, OSError) as e:
                raise SystemExit(f"dfly-peer: cannot set up the proxy CA: {e}") from None
            self._log.info(
                "proxy CA {state} at {path}; clients of hijacked hosts must trust it",
                state="created" if created else "found", path=cert_path,
            )
        # Idle keep-alive connections (hijacked ones included) close after --idle-timeout
        # (twisted.web suspends the timer while a request is being answered).
        return ProxySite(
            resource,
            self._reactor,
            ConnectRules.build(config["hijack"], config["connect-ports"]),
            authority=authority,
            connect_timeout=config["connect-timeout"],
            timeout=config["idle-timeout"],
        )

    def make_proxy(self, node: PeerNode) -> Any:
        """The proxy resource, with an upstream agent verifying HTTPS (L{upstream_policy})."""
        from twisted.web.client import RedirectAgent

        from dfly.proxy.resource import ProxyResource

        config = self._config
        agent = make_upstream_agent(self._reactor, self.upstream_policy())
        return ProxyResource(
            self._reactor,
            node,
            agent,
            RedirectAgent(agent),
            registry=config["registry"],
            allowed=parse_allowed(config["registry-allow"]),
            rules=P2PRules(config["p2p-rule"]),
            filters=config["filter-param"],
            fallback_after=config["fallback-after"],
            upstream_timeout=config["upstream-timeout"],
        )

    def upstream_policy(self) -> Any:
        """The C{IPolicyForHTTPS} for the proxy's https upstreams: the system's CAs, or
        C{--upstream-ca}."""
        from dfly.tls import client_tls_policy

        return client_tls_policy(self._config["upstream-ca"])

    def listening(self, ports: list[Any]) -> None:
        assert self.node is not None
        node, config = self.node, self._config
        port = ports[0].getHost().port
        sock = socket_path(config["home"])
        self._log.info(
            "peer {peer_id} uploading on port {port}, local API at {sock}", peer_id=node.peer_id, port=port, sock=sock
        )
        node.start(port)
        info: dict[str, Any] = {"port": port, "socket": sock, "pid": os.getpid(), "peer": node.peer_id}
        if config["proxy"]:
            info["proxy"] = ports[2].getHost().port
            self._log.info("proxy listening on port {proxy}", proxy=info["proxy"])
        write_ready_file(config["ready-file"], info)

    def stopService(self) -> Deferred[Any]:
        if self.node is not None:
            self.node.stop()
        return super().stopService()


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return PeerService(reactor, config)
