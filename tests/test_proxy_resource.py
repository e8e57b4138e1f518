"""The proxy resource through treq's StubTreq, with a fake registry upstream and a fake swarm.

The client side and the upstream side are both in-memory HTTP connections
(treq's RequestTraversalAgent); timers run on a Clock.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from proxyhelpers import BLOB, BLOB_PATH, DIGEST, TID, Env, P
from treq.testing import StubTreq
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from dfly.errors import TaskFailed
from dfly.proxy.routes import P2PRules, parse_allowed
from dfly.urls import digest_task_id


class Hijacked(Resource):
    """What the TLS interception hands on: origin-form requests carrying dfly_origin."""

    isLeaf = True

    def __init__(self, inner: Resource, origin: str) -> None:
        super().__init__()
        self.inner, self.origin = inner, origin

    def render(self, request: Request) -> Any:
        request.dfly_origin = self.origin  # type: ignore[attr-defined]
        return self.inner.render(request)


@pytest.fixture
def env(tmp_path: Any) -> Any:
    e = Env(str(tmp_path))
    yield e
    e.node.store.close()


def test_blob_streams_from_the_swarm_as_pieces_arrive(env: Env) -> None:
    """A blob GET checks the registry with HEAD, then streams the swarm's bytes in order
    with the registry's content type, the digest and the length; no registry GET happens."""
    got = env.get(BLOB_PATH, {b"authorization": [b"Bearer t"]})
    assert got == []  # headers wait for the first bytes
    assert [m for m, _, _ in env.registry.seen] == ["HEAD"]
    assert env.registry.seen[0][2]["authorization"] == ["Bearer t"]
    req = env.node.requests[0]
    assert req.digest == DIGEST and req.headers == ["Authorization: Bearer t"]
    tid = req.task_id  # with credentials: scoped to the registry (digest_scope)
    assert tid == digest_task_id(DIGEST, "http://registry.example:80") != TID
    env.node.info(tid, len(BLOB), P)
    env.node.piece(tid, 0, BLOB)
    env.pump()
    (response,) = got
    assert response.code == 200
    h = response.headers
    assert response.length == len(BLOB)
    assert h.getRawHeaders("docker-content-digest") == [DIGEST]
    assert h.getRawHeaders("content-type") == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    body = env.body(response)
    assert body == []
    count = env.node.downloads[tid].piece_count
    assert count is not None
    for n in range(1, count):
        env.node.piece(tid, n, BLOB)
    env.node.finish(tid)
    env.pump()
    assert body == [BLOB]
    assert env.registry.gets() == []


def test_range_request_from_the_swarm(env: Env) -> None:
    """Range gets 206 with Content-Range; an unsatisfiable one 416 with bytes */length."""
    env.node.download(env_request())
    env.node.deliver(TID, BLOB, P)
    (r,) = env.get(BLOB_PATH, {b"range": [b"bytes=100-299"]})
    assert r.code == 206 and r.headers.getRawHeaders("content-range") == [f"bytes 100-299/{len(BLOB)}"]
    assert env.body(r) == [BLOB[100:300]]
    (r,) = env.get(BLOB_PATH, {b"range": [b"bytes=999999-"]})
    assert r.code == 416 and r.headers.getRawHeaders("content-range") == [f"bytes */{len(BLOB)}"]
    (r,) = env.get(BLOB_PATH, {b"range": [b"bytes=1-2,5-6"]})
    assert r.code == 200 and env.body(r) == [BLOB]


def env_request(headers: list[str] | None = None) -> Any:
    from dfly.peer.node import DownloadRequest

    return DownloadRequest("http://registry.example" + BLOB_PATH, headers=headers or [], digest=DIGEST)


def test_refused_head_passes_the_registry_answer(env: Env) -> None:
    """A client the registry refuses gets the registry's own 401 (with WWW-Authenticate and
    body) and no swarm bytes, even when the swarm holds the blob."""
    held = env_request(["Authorization: Bearer secret"])
    env.node.download(held)
    env.node.deliver(held.task_id, BLOB, P)
    env.registry.token = "secret"
    (r,) = env.get(BLOB_PATH, {b"authorization": [b"Bearer wrong"]})
    assert r.code == 401
    assert r.headers.getRawHeaders("www-authenticate") == ['Bearer realm="https://auth.example/token",scope="x"']
    assert env.body(r) == [b'{"errors":[{"code":"UNAUTHORIZED"}]}']
    assert len(env.node.requests) == 1  # only the set-up's download: the refused client never joined
    (r,) = env.get(BLOB_PATH, {b"authorization": [b"Bearer secret"]})
    assert r.code == 200 and env.body(r) == [BLOB]


def test_unknown_blob_is_404(env: Env) -> None:
    """A blob the registry does not have is its 404, passed through."""
    other = "/v2/lib/app/blobs/sha256:" + "0" * 64
    (r,) = env.get(other)
    assert r.code == 404 and env.body(r) == [b'{"errors":[{"code":"BLOB_UNKNOWN"}]}']
    assert env.node.requests == []


def test_swarm_too_slow_falls_back_to_the_registry(env: Env) -> None:
    """With no bytes from the swarm within fallback_after, the blob comes from the registry,
    digest checked; the download is left running."""
    got = env.get(BLOB_PATH)
    assert got == []
    env.clock.advance(5.0)
    env.pump()
    (r,) = got
    assert r.code == 200 and env.body(r) == [BLOB]
    assert env.registry.gets() == [BLOB_PATH]
    assert env.node.downloads[TID].watchers == []


def test_swarm_failure_before_headers_falls_back(env: Env) -> None:
    """A download that fails before the response began sends the client to the registry."""
    got = env.get(BLOB_PATH)
    env.node.fail(TID, TaskFailed("no supernode"))
    env.pump()
    (r,) = got
    assert r.code == 200 and env.body(r) == [BLOB]


def test_wrong_swarm_bytes_abort_the_client(env: Env) -> None:
    """Swarm bytes that do not hash to the digest: the connection is cut before the last
    chunk, so the client's body read fails instead of returning a blob."""
    wrong = BLOB[:-1] + b"?"
    got = env.get(BLOB_PATH)
    env.node.deliver(TID, wrong, P)
    env.pump()
    (r,) = got
    assert r.code == 200
    body = env.body(r)
    assert len(body) == 1 and isinstance(body[0], Failure)


def test_wrong_registry_bytes_abort_the_client_on_fallback(env: Env) -> None:
    """The fallback checks the digest too: a registry serving wrong bytes gets the client's
    connection aborted before the last chunk."""
    env.registry.blob = BLOB[:-1] + b"?"
    env.node.refuse = TaskFailed("swarm refused")
    (r,) = env.get(BLOB_PATH)
    # The blob fits in one held-back chunk: not even the headers went out.
    assert isinstance(r, Failure) or isinstance(env.body(r)[0], Failure)
    assert env.registry.gets() == [BLOB_PATH]


def test_swarm_failure_mid_stream_aborts_without_registry(env: Env) -> None:
    """After headers went out, a failed download that the registry cannot continue (it
    is unreachable now) cuts the client's connection."""
    env.registry.ranges = False
    got = env.get(BLOB_PATH)
    env.node.info(TID, len(BLOB), P)
    env.node.piece(TID, 0, BLOB)
    env.pump()
    (r,) = got
    body = env.body(r)
    env.node.fail(TID, TaskFailed("gone"))
    env.pump()
    assert len(body) == 1 and isinstance(body[0], Failure)


def test_client_going_away_releases_the_stream(env: Env) -> None:
    """A client that disconnects mid-body stops its stream and releases the task."""
    got = env.get(BLOB_PATH)
    env.node.info(TID, len(BLOB), P)
    env.node.piece(TID, 0, BLOB)
    env.pump()
    (r,) = got
    store = env.node.store.get(TID)
    assert store is not None and store.leases == 1
    assert r.code == 200
    for pump in env.client._agent._pumps:  # the client hangs up
        pump.client.transport.abortConnection()
    env.pump()
    assert store.leases == 0 and env.node.downloads[TID].watchers == []


def test_manifest_404_goes_direct(env: Env) -> None:
    """Manifests are not blobs: straight to the registry, its 404 and body unchanged."""
    (r,) = env.get("/v2/lib/app/manifests/latest")
    assert r.code == 404 and env.body(r) == [b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}']
    assert r.headers.getRawHeaders("docker-distribution-api-version") == ["registry/2.0"]
    assert env.node.requests == []


def test_head_of_a_blob_goes_direct(env: Env) -> None:
    """HEAD is never served from the swarm; the registry's length comes through."""
    (r,) = env.get(BLOB_PATH, method="HEAD")
    assert r.code == 200 and r.headers.getRawHeaders("content-length") == [str(len(BLOB))]
    assert env.node.requests == []


def test_push_body_reaches_the_registry(env: Env) -> None:
    """A PUT's body is forwarded whole; the registry's 201 and Location come back."""
    data = bytes(range(256)) * 1000
    (r,) = env.get("/v2/lib/app/blobs/uploads/u1?digest=x", method="PUT", data=data)
    assert r.code == 201
    assert r.headers.getRawHeaders("location") == [f"/v2/lib/app/blobs/{DIGEST}"]
    (body,) = env.body(r)
    assert json.loads(body) == {"got": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_direct_redirect_location_unchanged(env: Env) -> None:
    """Direct mode passes a redirect through as the registry sent it."""
    (r,) = env.get("/moved")
    assert r.code == 302 and r.headers.getRawHeaders("location") == ["/elsewhere"]


def test_hop_by_hop_headers_dropped(env: Env) -> None:
    """Connection-scoped and proxy headers never reach the registry."""
    env.get("/v2/lib/app/manifests/x", {b"connection": [b"x-private"], b"x-private": [b"1"],
                                        b"proxy-authorization": [b"Basic abc"], b"x-keep": [b"yes"],
                                        b"expect": [b"100-continue"], b"te": [b"trailers"]})
    headers = env.registry.seen[-1][2]
    assert "x-private" not in headers and "proxy-authorization" not in headers and headers["x-keep"] == ["yes"]
    assert "expect" not in headers and "te" not in headers


def test_connect_is_501(env: Env) -> None:
    """CONNECT is not handled here."""
    (r,) = env.get("/", method="CONNECT")
    assert r.code == 501


def test_ns_not_allowed_is_403(env: Env) -> None:
    """A mirror request naming a registry that is not allowed gets a clear 403."""
    (r,) = env.get("/v2/x/manifests/1?ns=evil.example")
    assert r.code == 403 and b"evil.example" in env.body(r)[0]


def test_ns_allowed_strips_the_parameter(tmp_path: Any) -> None:
    """An allowed ?ns= picks that upstream; the parameter is not forwarded."""
    e = Env(str(tmp_path), allowed=parse_allowed(["http://other.example"]))
    (r,) = e.get("/v2/lib/app/manifests/1?ns=other.example")
    assert r.code == 404 and e.registry.seen[-1][1] == "/v2/lib/app/manifests/1"
    e.node.store.close()


def test_p2p_rule_file_through_the_swarm(tmp_path: Any) -> None:
    """A URL matching a --p2p-rule is a swarm download (no HEAD), identity without signatures."""
    e = Env(str(tmp_path), rules=P2PRules([r"/files/"]))
    got = e.get("/files/big.tar?X-Amz-Signature=abc&v=1")
    req = e.node.requests[0]
    assert req.digest is None and "X-Amz-Signature" in req.filters
    e.node.deliver(req.task_id, BLOB, P)
    e.pump()
    (r,) = got
    assert r.code == 200 and r.headers.getRawHeaders("docker-content-digest") is None
    assert e.body(r) == [BLOB]
    assert e.registry.seen == []
    e.node.store.close()


def test_hijacked_request_goes_to_the_tunnel_origin(tmp_path: Any) -> None:
    """A request carrying dfly_origin is routed to that origin like an absolute-form request."""
    e = Env(str(tmp_path))
    e.client = StubTreq(Hijacked(e.proxy, "http://tunnel.example:8443"))
    got = e.get(BLOB_PATH)
    assert e.node.requests[0].url == "http://tunnel.example:8443" + BLOB_PATH
    e.node.deliver(TID, BLOB, P)
    e.pump()
    assert got[0].code == 200 and e.body(got[0]) == [BLOB]
    e.node.store.close()


def test_swarm_failure_mid_stream_continues_from_the_registry(env: Env) -> None:
    """After headers went out, a failed download is continued from the registry with a
    Range from the first byte the client lacks; the client gets the whole, verified blob."""
    got = env.get(BLOB_PATH)
    env.node.info(TID, len(BLOB), P)
    for n in range(30):
        env.node.piece(TID, n, BLOB)
    env.pump()
    (r,) = got
    body = env.body(r)
    env.node.fail(TID, TaskFailed("gone"))
    env.pump()
    assert body == [BLOB]
    ranges = [h.get("range") for m, p, h in env.registry.seen if m == "GET"]
    assert len(ranges) == 1 and ranges[0] is not None and ranges[0][0].startswith("bytes=")
    start = int(ranges[0][0][6:-1])
    assert 0 < start < len(BLOB)


def test_stalled_swarm_continues_from_the_registry(env: Env) -> None:
    """A swarm that stops making progress while the client reads is abandoned after
    fallback_after seconds and the rest comes from the registry."""
    got = env.get(BLOB_PATH)
    env.node.info(TID, len(BLOB), P)
    env.node.piece(TID, 0, BLOB)
    env.node.piece(TID, 1, BLOB)
    env.pump()
    (r,) = got
    body = env.body(r)
    assert body == []
    env.clock.advance(5)
    env.pump()
    env.clock.advance(5)
    env.pump()
    assert body == [BLOB]
    assert env.node.store.get(TID).leases == 0  # type: ignore[union-attr]


def test_continuation_checks_the_digest(env: Env) -> None:
    """Continued bytes that make the blob hash wrong abort the connection."""
    env.registry.blob = BLOB[:-1] + b"?"
    got = env.get(BLOB_PATH)
    env.node.info(TID, len(BLOB), P)
    for n in range(30):
        env.node.piece(TID, n, BLOB)
    env.pump()
    (r,) = got
    body = env.body(r)
    env.node.fail(TID, TaskFailed("gone"))
    env.pump()
    assert len(body) == 1 and isinstance(body[0], Failure)
