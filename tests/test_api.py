"""The supernode's HTTP API (dfly.supernode.api) through treq's StubTreq: no sockets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from memhelpers import FakeHttp, FakeResponse, StubWire, body, md5
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from dfly import __version__
from dfly.pieces import MIB, OVERHEAD
from dfly.supernode.api import make_api
from dfly.supernode.scheduler import CDN
from dfly.supernode.service import Supernode, SupernodeSession
from dfly.urls import task_id_for

P = 1 * MIB
URL = "http://origin.example/pkg.tar"
CONTENT = body((P - OVERHEAD) + 777, seed=11)  # two pieces
BASE = "http://supernode.test"


@dataclass
class Api:
    node: Supernode
    http: FakeHttp
    stub: StubTreq

    def resolve(self, d: Deferred[Any]) -> Any:
        """Run the stub until C{d} fires; return its result (raising a failure)."""
        out: list[Any] = []
        d.addBoth(out.append)
        self.stub.flush()
        assert out, "the request did not complete"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def get(self, path: str) -> tuple[int, Any, Any]:
        """GET C{path}: status, decoded JSON body, response headers."""
        response = self.resolve(self.stub.get(BASE + path))
        return response.code, self.resolve(self.stub.json_content(response)), response.headers


@pytest.fixture
def api(tmp_path: Any) -> Iterator[Api]:
    http = FakeHttp()
    node = Supernode(MemoryReactorClock(), http, str(tmp_path), piece_size=P)
    yield Api(node, http, StubTreq(make_api(node)))
    for task in list(node.tasks.values()):
        task.close()


def peer(node: Supernode, peer_id: str, port: int) -> tuple[SupernodeSession, StubWire]:
    wire = StubWire(host="198.51.100.7")
    session = SupernodeSession(wire, node)  # type: ignore[arg-type]
    session.control_received({"op": "hello", "peer": peer_id, "port": port})
    return session, wire


def test_tasks_empty(api: Api) -> None:
    """With no task, /api/v1/tasks answers 200 with an empty list, as JSON, not cacheable."""
    code, doc, headers = api.get("/api/v1/tasks")
    assert code == 200
    assert doc == {"tasks": []}
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert api.get("/api/v1/tasks/")[:2] == (200, {"tasks": []})


def test_tasks_list_and_one(api: Api) -> None:
    """After a peer downloads a cached file, /api/v1/tasks lists the task with its id, url,
    length, piece size, state, bytes from the origin and served, and its peers with their
    progress; /api/v1/tasks/<id> returns that same entry."""
    session, wire = peer(api.node, "p1", 4321)
    session.control_received({"op": "register", "req": 1, "url": URL})
    tid = task_id_for(URL)

    code, doc, _ = api.get("/api/v1/tasks")
    (running,) = doc["tasks"]
    assert (running["id"], running["state"], running["length"]) == (tid, "running", None)

    api.http.respond(0, FakeResponse(200, [CONTENT]))
    # p1 fetches piece 0 from the CDN and reports it; serving it counts as served bytes.
    source, _, data_len = api.node.lookup(tid, 0, "p1")
    assert source.on_done is not None
    source.on_done(True, source.total)
    session.control_received({"op": "done", "task": tid, "piece": 0, "source": CDN})

    code, doc, _ = api.get("/api/v1/tasks")
    assert code == 200
    (task,) = doc["tasks"]
    assert task["id"] == tid
    assert task["url"] == URL
    assert task["length"] == len(CONTENT)
    assert task["piece_size"] == P
    assert task["piece_count"] == 2 and task["pieces_cached"] == 2
    assert task["state"] == "done"
    assert task["md5"] == md5(CONTENT)
    assert task["source_bytes"] == len(CONTENT)
    assert task["served_bytes"] == data_len + OVERHEAD
    (p,) = task["peers"]
    assert (p["id"], p["host"], p["port"]) == ("p1", "198.51.100.7", 4321)
    assert p["pieces"] == 1 and p["done"] is False
    assert p["from_cdn_bytes"] == data_len and p["from_peers_bytes"] == 0
    assert p["blacklisted"] is False

    code, one, _ = api.get(f"/api/v1/tasks/{tid}")
    assert code == 200
    assert one == task


def test_unknown_task_is_404(api: Api) -> None:
    """A task id that is not known gives 404 with a JSON error."""
    code, doc, _ = api.get("/api/v1/tasks/" + "ab" * 32)
    assert code == 404
    assert doc == {"error": "no such task"}


def test_failed_task_not_listed(api: Api) -> None:
    """A task whose origin failed is forgotten: it is not listed and its id gives 404."""
    session, _ = peer(api.node, "p1", 4321)
    session.control_received({"op": "register", "req": 1, "url": URL})
    api.http.respond(0, FakeResponse(500, [], phrase=b"Oops"))
    assert api.get("/api/v1/tasks")[1] == {"tasks": []}
    assert api.get("/api/v1/tasks/" + task_id_for(URL))[0] == 404


def test_healthz(api: Api) -> None:
    """/healthz answers ok with the version and the numbers of tasks and connected peers."""
    code, doc, _ = api.get("/healthz")
    assert code == 200
    assert doc == {"ok": True, "version": __version__, "tasks": 0, "peers": 0}
    session, _ = peer(api.node, "p1", 1)
    session.control_received({"op": "register", "req": 1, "url": URL})
    assert api.get("/healthz")[1] == {"ok": True, "version": __version__, "tasks": 1, "peers": 1}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Twisted's default NoResource
def test_unknown_path_is_404(api: Api) -> None:
    """Paths outside the API are not found."""
    response = api.resolve(api.stub.get(BASE + "/api/v2/tasks"))
    assert response.code == 404
    api.resolve(api.stub.content(response))
