"""The counting origin of L{dfly.devtools.origin} without validators: no ETag, no
Last-Modified, and no conditional answers (every GET is a 200 with the whole file), as many
plain file servers and object stores behind signed URLs behave.

    python tests/plainorigin.py --dir DIR --port-file F
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.web.server import Request, Site

from dfly.devtools.origin import Options, Origin


class PlainRequest(Request):
    """A request that never sends validators and never answers 304."""

    def setHeader(self, name: Any, value: Any) -> None:
        key = name.lower() if isinstance(name, bytes) else name.lower().encode()
        if key in (b"etag", b"last-modified"):
            return
        super().setHeader(name, value)

    def setLastModified(self, when: float) -> None:  # type: ignore[override]
        return None


def start(swarm: Any, directory: str) -> int:
    """Start this origin as C{swarm}'s origin process; returns (and records) its port."""
    import time

    ready = os.path.join(swarm.root, "origin.port")
    if os.path.exists(ready):
        os.unlink(ready)
    proc = swarm.spawn("origin", [sys.executable, __file__, "--dir", directory, "--port-file", ready], None)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"plain origin did not start; see {proc.log}")
        time.sleep(0.02)
    with open(ready) as f:
        swarm.origin_port = int(f.read())
    return int(swarm.origin_port)


def main() -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    opts = Options()
    opts.parseOptions(sys.argv[1:])

    def listening(port: Any) -> None:
        tmp = opts["port-file"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port.getHost().port))
        os.replace(tmp, opts["port-file"])

    site = Site(Origin(opts["dir"], None, reactor), requestFactory=PlainRequest)
    serverFromString(reactor, opts["port"]).listen(site).addCallback(listening)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
