"""A small HTTP BitTorrent tracker for the benchmark's aria2c swarm on loopback.

Accepts announces for any info-hash (stock trackers often serve only a
configured list) and answers with bencoded replies as BEP 3 and BEP 23
describe: C{interval}, C{complete}, C{incomplete} and C{peers} as compact
6-byte IPv4 address+port strings (or a list of dictionaries when the client
asks with C{compact=0}).  A peer is forgotten on C{event=stopped} or when it
has not announced for three intervals.  Bad announces get a C{failure reason}
reply, never an exception.  C{GET /_stats} returns JSON counts per torrent.

    python -m dfly.devtools.tracker --port tcp:0:interface=127.0.0.1 --port-file F [--interval 2]
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dfly.devtools import bencode

MAX_NUMWANT = 200
DEFAULT_NUMWANT = 50


@dataclass
class PeerEntry:
    host: str
    port: int
    left: int
    seen: float


class TrackerResource(Resource):
    """C{/announce} and C{/_stats}; peers per info-hash kept in memory."""

    isLeaf = True

    def __init__(self, clock: Any, interval: int = 2, rng: random.Random | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.interval = interval
        self.rng = rng or random.Random()
        self.torrents: dict[bytes, dict[bytes, PeerEntry]] = {}
        self.completed: dict[bytes, int] = {}
        self.announces = 0

    def render_GET(self, request: Request) -> bytes:
        path = request.path.rstrip(b"/")
        if path == b"/_stats":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.stats()).encode()
        request.setHeader(b"content-type", b"text/plain")
        if path != b"/announce":
            request.setResponseCode(404)
            return bencode.encode({"failure reason": "unknown path"})
        host = getattr(request.getClientAddress(), "host", "")
        return self.announce(request.args or {}, host)

    def announce(self, args: dict[bytes, list[bytes]], host: str) -> bytes:
        """The bencoded reply to one announce with query C{args} from address C{host}."""
        try:
            info_hash = _one(args, b"info_hash")
            peer_id = _one(args, b"peer_id")
            if len(info_hash) != 20 or len(peer_id) != 20:
                raise ValueError("info_hash and peer_id must be 20 bytes")
            port = int(_one(args, b"port"))
            if not 0 < port < 65536:
                raise ValueError("port out of range")
            left = int(_one(args, b"left", b"0"))
            if left < 0:
                raise ValueError("negative left")
            numwant = min(MAX_NUMWANT, max(0, int(_one(args, b"numwant", str(DEFAULT_NUMWANT).encode()))))
            event = _one(args, b"event", b"")
            compact = _one(args, b"compact", b"1") != b"0"
            address = ipaddress.ip_address(host)
        except (KeyError, ValueError) as e:
            return bencode.encode({"failure reason": f"bad announce: {e}"})
        self.announces += 1
        now = self.clock.seconds()
        peers = self.torrents.setdefault(info_hash, {})
        self._expire(peers, now)
        if event == b"stopped":
            peers.pop(peer_id, None)
        else:
            if event == b"completed":
                self.completed[info_hash] = self.completed.get(info_hash, 0) + 1
            peers[peer_id] = PeerEntry(str(address), port, left, now)
        others = [p for pid, p in peers.items() if pid != peer_id]
        chosen = self.rng.sample(others, min(numwant, len(others)))
        reply: dict[str, Any] = {
            "interval": self.interval,
            "min interval": max(1, self.interval // 2),
            "complete": sum(1 for p in peers.values() if p.left == 0),
            "incomplete": sum(1 for p in peers.values() if p.left > 0),
        }
        if compact:
            reply["peers"] = b"".join(
                ipaddress.IPv4Address(p.host).packed + p.port.to_bytes(2, "big")
                for p in chosen
                if ipaddress.ip_address(p.host).version == 4
            )
        else:
            reply["peers"] = [{"ip": p.host, "port": p.port} for p in chosen]
        return bencode.encode(reply)

    def _expire(self, peers: dict[bytes, PeerEntry], now: float) -> None:
        for pid in [pid for pid, p in peers.items() if now - p.seen > 3 * self.interval]:
            del peers[pid]

    def stats(self) -> dict[str, Any]:
        return {
            "announces": self.announces,
            "torrents": {
                h.hex(): {
                    "seeders": sum(1 for p in peers.values() if p.left == 0),
                    "leechers": sum(1 for p in peers.values() if p.left > 0),
                    "completed": self.completed.get(h, 0),
                }
                for h, peers in self.torrents.items()
            },
        }


def _one(args: dict[bytes, list[bytes]], key: bytes, default: bytes | None = None) -> bytes:
    values = args.get(key)
    if not values:
        if default is None:
            raise KeyError(f"missing {key.decode()}")
        return default
    return values[0]


class Options(usage.Options):
    optParameters = [
        ["port", None, "tcp:0:interface=127.0.0.1", "Endpoint to listen on."],
        ["port-file", None, None, "Write the port number here once listening."],
        ["interval", None, 2, "Seconds between announces asked of clients.", int],
    ]


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    opts = Options()
    opts.parseOptions(sys.argv[1:] if argv is None else argv)
    site = Site(TrackerResource(reactor, opts["interval"]))
    site.noisy = False

    def listening(port: Any) -> None:
        number = port.getHost().port
        if opts["port-file"]:
            tmp = opts["port-file"] + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(number))
            os.replace(tmp, opts["port-file"])
        print(f"tracker on port {number}", flush=True)

    def failed(f: Any) -> None:
        print(f"tracker: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    d = serverFromString(reactor, opts["port"]).listen(site)
    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
