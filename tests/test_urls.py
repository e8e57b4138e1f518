"""Credentials in URLs (dfly.urls): turned into a header by clients, refused on the wire,
never shown in a log or message."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from memhelpers import FakeHttp, StubWire
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from dfly import dfget
from dfly.errors import DflyError
from dfly.peer.localapi import LocalApiSession
from dfly.supernode.service import Supernode, SupernodeSession
from dfly.urls import check_url, credential_key, redact_url, task_id_for, url_credentials


def basic(pair: bytes) -> str:
    return "Authorization: Basic " + base64.b64encode(pair).decode()


def test_url_credentials_become_a_basic_header() -> None:
    """user:password@ leaves the URL and becomes an 'Authorization: Basic' header line after
    the others, percent-decoded and UTF-8 (RFC 7617); the rest of the URL is kept."""
    url, lines = url_credentials("http://alice:s3cr%40t@origin.example:8080/dir/f.bin?x=1", ["X-A: 1"])
    assert url == "http://origin.example:8080/dir/f.bin?x=1"
    assert lines == ["X-A: 1", basic(b"alice:s3cr@t")]
    assert url_credentials("https://bob@h/f", []) == ("https://h/f", [basic(b"bob:")])
    assert url_credentials("https://h\u00e9:p\u00e4ss@h/f", [])[1] == [basic("h\u00e9:p\u00e4ss".encode())]


def test_url_credentials_are_the_same_task_as_the_header() -> None:
    """A URL with user:password names the same task as the bare URL with the header a client
    would send, and another task than the bare URL alone (credentials are part of it)."""
    url, lines = url_credentials("http://alice:pw@h/f", [])
    same = task_id_for(url, "", credential_key([basic(b"alice:pw")]))
    assert task_id_for(url, "", credential_key(lines)) == same
    assert task_id_for("http://h/f") != same


@pytest.mark.parametrize("url", ["http://h/f", "http://[::1", "ftp://a:b@h/f", "not a url"])
def test_url_credentials_leave_other_urls_alone(url: str) -> None:
    """URLs without credentials, invalid ones and other schemes are returned unchanged, for
    check_url to judge."""
    assert url_credentials(url, ["X: 1"]) == (url, ["X: 1"])


def test_url_credentials_and_an_authorization_header_conflict() -> None:
    """Credentials in the URL and an Authorization header at once are refused."""
    with pytest.raises(DflyError, match="credentials given twice"):
        url_credentials("http://a:b@h/f", ["authorization: Bearer x"])


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://alice:pw@h/f", "http://***@h/f"),
        ("https://tok@h:1/f@g?q=a@b", "https://***@h:1/f@g?q=a@b"),
        ("http://h/f?u=a@b", "http://h/f?u=a@b"),
        ("http://a:pw@[::1", "http://***@[::1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """redact_url hides whatever precedes '@' in the authority, and nothing else."""
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["http://alice:pw@h/f", "http://alice:pw@h:bad/f", "gopher://alice:pw@h/"])
def test_check_url_refuses_credentials_without_showing_them(url: str) -> None:
    """check_url (used by the peer and the supernode) refuses a URL with credentials (none
    travels in a URL), and its message never holds the password."""
    with pytest.raises(DflyError) as info:
        check_url(url)
    assert "pw" not in str(info.value)


def test_dfget_moves_url_credentials_into_a_header() -> None:
    """dfget turns user:password@ into the header before anything else; with --header
    'Authorization: ...' as well it is a usage error."""
    opts = dfget.Options()
    opts.parseOptions(["http://alice:pw@h/dir/f.bin", "-H", "X-A: 1"])
    assert opts["url"] == "http://h/dir/f.bin" and opts["output"] == "f.bin"
    assert opts["header"] == ["X-A: 1", basic(b"alice:pw")]
    with pytest.raises(usage.UsageError, match="credentials given twice"):
        dfget.Options().parseOptions(["http://alice:pw@h/f", "-H", "Authorization: Bearer t"])


class RecordingNode:
    """What a LocalApiSession needs of a PeerNode: records the requests it is handed."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.clock = MemoryReactorClock().seconds

    def download(self, request: Any, progress: Any) -> Deferred[Any]:
        self.requests.append(request)
        return Deferred()

    def verified_prefix(self, task_id: str) -> None:
        return None


def test_local_api_moves_url_credentials_into_a_header() -> None:
    """The daemon's local API does as dfget does: the peer is asked for the bare URL with an
    Authorization header; credentials given twice are a failure, not a download."""
    node = RecordingNode()
    session = LocalApiSession(StubWire(), node)  # type: ignore[arg-type]
    session.control_received({"op": "download", "url": "http://alice:pw@h/f", "headers": []})
    (request,) = node.requests
    assert request.url == "http://h/f" and request.headers == [basic(b"alice:pw")]
    wire = StubWire()
    session = LocalApiSession(wire, node)  # type: ignore[arg-type]
    session.control_received(
        {"op": "download", "url": "http://alice:pw@h/f", "headers": ["Authorization: Bearer t"]}
    )
    assert len(node.requests) == 1
    (failed,) = wire.ops("failed")
    assert "credentials given twice" in failed["reason"]


def test_supernode_refuses_url_credentials_without_fetching(tmp_path: Any) -> None:
    """A registration whose URL holds credentials is refused, with a reason that does not
    show them, and nothing is fetched (peers send them as a header)."""
    http = FakeHttp()
    node = Supernode(MemoryReactorClock(), http, str(tmp_path / "home"))
    wire = StubWire()
    session = SupernodeSession(wire, node)  # type: ignore[arg-type]
    session.connection_made()
    session.control_received({"op": "hello", "peer": "p1", "port": 4000})
    session.control_received({"op": "register", "req": 1, "url": "http://alice:pw@h/f"})
    (refused,) = wire.ops("refused")
    assert "credentials" in refused["reason"] and "pw" not in refused["reason"]
    assert http.requests == [] and node.tasks == {}


def test_a_fragment_names_the_same_file() -> None:
    """A URL's fragment is never sent to the origin: with or without one (and with any
    filtered keys) it is one task, and dfget drops it from the URL it asks for."""
    from dfly.urls import filter_url

    assert filter_url("http://h/f.bin#part", []) == "http://h/f.bin"
    assert filter_url("http://h/f.bin?a=1&sig=2#x", ["sig"]) == "http://h/f.bin?a=1"
    assert filter_url("http://h/f.bin?a=1", []) == "http://h/f.bin?a=1"
    opts = dfget.Options()
    opts.parseOptions(["http://h/f.bin#frag", "-o", "x"])
    assert opts["url"] == "http://h/f.bin"
