"""Pure routing decisions of the proxy: targets, blob paths, rules, ranges, allow-lists."""

from __future__ import annotations

import pytest

from dfly.errors import DflyError
from dfly.proxy.routes import (
    DEFAULT_FILTER_PARAMS,
    P2PRules,
    RangeNotSatisfiable,
    RouteError,
    blob_digest,
    check_registry,
    classify,
    parse_allowed,
    parse_range,
)
from dfly.urls import digest_task_id, filter_url

D = "sha256:" + "ab" * 32
REG = "https://registry.example"


def test_mirror_request_goes_to_the_default_registry() -> None:
    """An origin-form request is a mirror request for --registry, path and query kept."""
    t = classify(f"/v2/library/alpine/blobs/{D}?x=1", registry=REG)
    assert t.mode == "mirror"
    assert t.url == f"{REG}/v2/library/alpine/blobs/{D}?x=1"
    assert t.origin == REG and t.path == f"/v2/library/alpine/blobs/{D}"


def test_ns_names_an_allowed_upstream_and_is_stripped() -> None:
    """containerd's ?ns=HOST picks an allowed registry (https unless listed as http://) and
    is removed from the forwarded query."""
    allowed = parse_allowed(["ghcr.io", "http://127.0.0.1:5000"])
    t = classify("/v2/a/b/manifests/v1?ns=ghcr.io", registry=REG, allowed=allowed)
    assert t.url == "https://ghcr.io/v2/a/b/manifests/v1"
    t = classify("/v2/a/manifests/v1?n=3&ns=127.0.0.1:5000&last=x", allowed=allowed)
    assert t.url == "http://127.0.0.1:5000/v2/a/manifests/v1?n=3&last=x"


def test_ns_docker_io_means_docker_hub_registry_host() -> None:
    """ns=docker.io is Docker Hub, whose registry API lives at registry-1.docker.io."""
    t = classify("/v2/library/alpine/manifests/3?ns=docker.io", allowed=parse_allowed(["docker.io"]))
    assert t.url == "https://registry-1.docker.io/v2/library/alpine/manifests/3"


def test_disallowed_ns_is_403() -> None:
    """A host not on the allow-list is refused with 403 and a message naming it."""
    with pytest.raises(RouteError) as e:
        classify("/v2/x/manifests/1?ns=evil.example", registry=REG, allowed=parse_allowed(["ghcr.io"]))
    assert e.value.status == 403 and "evil.example" in str(e.value)


def test_no_registry_and_no_ns_is_404() -> None:
    """Without --registry a mirror request that names no upstream cannot be routed."""
    with pytest.raises(RouteError) as e:
        classify("/v2/")
    assert e.value.status == 404


def test_absolute_form_is_a_forward_proxy_request() -> None:
    """GET http://host/path from an HTTP_PROXY client goes to that URL (fragment dropped)."""
    t = classify("http://files.example:8080/a/b.tar?sig=1#frag", registry=REG)
    assert t.mode == "forward" and t.url == "http://files.example:8080/a/b.tar?sig=1"
    assert classify("HTTPS://h.example/x").mode == "forward"


def test_hijacked_request_uses_the_tunnel_origin() -> None:
    """A decrypted CONNECT request (origin-form plus dfly_origin) is treated as absolute-form."""
    t = classify(f"/v2/x/blobs/{D}", origin="https://ghcr.io:443", registry=REG)
    assert t.mode == "hijack" and t.url == f"https://ghcr.io:443/v2/x/blobs/{D}"
    with pytest.raises(RouteError):
        classify("http://other/x", origin="https://ghcr.io:443")


@pytest.mark.parametrize("uri", ["", "ftp://x/y", "*", "host:443", "http:///nohost", "http://h:99999/x", "/a b"])
def test_bad_targets_are_400(uri: str) -> None:
    """Request targets that are neither origin- nor absolute-form http(s) are 400."""
    with pytest.raises(RouteError) as e:
        classify(uri, registry=REG)
    assert e.value.status == 400


def test_allow_list_entries() -> None:
    """Entries are HOST[:PORT] (https) or scheme://HOST[:PORT]; anything else is refused."""
    assert parse_allowed(["Ghcr.IO", "http://h:5000/", "https://q"]) == {"ghcr.io": "https", "h:5000": "http", "q": "https"}
    for bad in ["ftp://h", "", "h/path", "user@h"]:
        with pytest.raises(DflyError):
            parse_allowed([bad])


def test_registry_url_checked() -> None:
    """--registry must be an http(s) URL; a trailing slash is dropped."""
    assert check_registry("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    for bad in ["127.0.0.1:5000", "ftp://x", "http://x?y=1"]:
        with pytest.raises(DflyError):
            check_registry(bad)


def test_blob_digest() -> None:
    """Only /v2/<name>/blobs/sha256:<64 lower hex> names a blob by digest."""
    assert blob_digest(f"/v2/library/alpine/blobs/{D}") == D
    assert blob_digest(f"/v2/a/b/c/blobs/{D}") == D
    assert blob_digest(f"/v2/a/blobs/{D.upper()}") is None
    assert blob_digest(f"/v2/a/blobs/{D}0") is None
    assert blob_digest(f"/v2/a/blobs/{D[:-1]}") is None
    assert blob_digest("/v2/a/blobs/uploads/123") is None
    assert blob_digest(f"/v2/a/manifests/{D}") is None
    assert blob_digest(f"/v2//blobs/{D}") is None
    assert blob_digest(f"/v3/a/blobs/{D}") is None


def test_blob_path_needs_a_canonical_repository_name() -> None:
    """A blob path whose repository name is not canonical (dot segments, empty segments,
    percent-escapes, upper case) is not a swarm blob: the registry answers such paths with a
    301 to the clean path before checking credentials, and the HEAD check takes a 3xx for a
    yes, so a client without credentials would otherwise get a private blob from the swarm."""
    assert blob_digest(f"/v2/my-org/app_1/web.v2/blobs/{D}") == D
    for name in ["x/../secret", "./secret", "/secret", "secret/", "a//b", "a/%2e%2e/b", "Secret", "a-/b", "a b"]:
        assert blob_digest(f"/v2/{name}/blobs/{D}") is None, name


def test_p2p_rules() -> None:
    """Rules are regexes searched in the whole URL; a bad one is a clear error."""
    rules = P2PRules([r"\.tar\.gz$", r"^https://cdn\.example/"])
    assert rules.match("http://x/y/z.tar.gz")
    assert rules.match("https://cdn.example/a")
    assert not rules.match("http://x/y/z.tar.gz?sig=1")
    assert not P2PRules([]).match("http://x/")
    with pytest.raises(DflyError):
        P2PRules(["(unclosed"])


def test_default_filter_params_drop_signatures() -> None:
    """Signed object-storage URLs of one object collapse to one identity."""
    a = "https://s3.example/b/o?X-Amz-Signature=1&X-Amz-Date=2&X-Amz-Credential=c&versionId=7"
    b = "https://s3.example/b/o?X-Amz-Date=3&X-Amz-Signature=9&X-Amz-Credential=d&versionId=7"
    assert filter_url(a, DEFAULT_FILTER_PARAMS) == filter_url(b, DEFAULT_FILTER_PARAMS) == "https://s3.example/b/o?versionId=7"
    az = "https://acct.blob.example/c/o?sv=1&se=2&sr=b&sp=r&sig=abc"
    assert filter_url(az, DEFAULT_FILTER_PARAMS) == "https://acct.blob.example/c/o"


def test_digest_task_id_is_scoped_to_the_origin_only_with_credentials() -> None:
    """Without credentials a digest names one task whatever the registry; with credentials
    the task is scoped to the origin (scheme, host, port: default ports normalised), so a
    request naming another host never joins a task fetched with credentials."""
    from dfly.urls import digest_scope

    d = "sha256:" + "ab" * 32
    auth = ["Authorization: Basic YTpi"]
    assert digest_scope("http://a.example/v2/x/blobs/" + d, []) == ""
    assert digest_scope("https://A.example/v2/x/blobs/" + d, auth) == "https://a.example:443"
    assert digest_scope("https://a.example:443/v2/y/blobs/" + d, ["Cookie: c"]) == "https://a.example:443"
    assert digest_scope("http://a.example:5000/v2/x/blobs/" + d, auth) == "http://a.example:5000"
    shared = digest_task_id(d)
    assert digest_task_id(d, digest_scope("http://a.example/v2/x/blobs/" + d, [])) == shared
    a = digest_task_id(d, digest_scope("https://a.example/v2/x/blobs/" + d, auth))
    b = digest_task_id(d, digest_scope("https://b.example/v2/x/blobs/" + d, auth))
    assert len({shared, a, b}) == 3
    assert a == digest_task_id(d, digest_scope("https://a.example/v2/other/blobs/" + d, ["Authorization: Bearer t"]))


def test_digest_task_id() -> None:
    """The task id of a blob depends on its digest only; a malformed digest is refused."""
    assert digest_task_id(D) == digest_task_id(D)
    assert digest_task_id(D) != digest_task_id("sha256:" + "cd" * 32)
    for bad in ["sha256:" + "AB" * 32, "sha512:" + "ab" * 64, "sha256:abc", D + "\n"]:
        with pytest.raises(DflyError):
            digest_task_id(bad)


@pytest.mark.parametrize(
    ("header", "length", "want"),
    [
        (None, 10, None),
        ("bytes=0-", 10, (0, 9)),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=3-5", 10, (3, 5)),
        ("bytes=9-", 10, (9, 9)),
        ("bytes=5-100", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-100", 10, (0, 9)),
        ("Bytes = 2-4", 10, (2, 4)),
        ("bytes=5-3", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("items=0-1", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=-", 10, None),
        ("bytes", 10, None),
        ("bytes=1-2-3", 10, None),
        ("bytes=+1-2", 10, None),
    ],
)
def test_parse_range(header: str | None, length: int, want: tuple[int, int] | None) -> None:
    """Single byte ranges are honoured (clamped to the end); anything else means the whole file."""
    assert parse_range(header, length) == want


@pytest.mark.parametrize(("header", "length"), [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0)])
def test_unsatisfiable_ranges(header: str, length: int) -> None:
    """A range that selects no byte of the file raises (answered 416)."""
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, length)


def test_parse_range_every_prefix_of_a_header() -> None:
    """Every prefix of a valid header, fed one byte more at a time, parses or is ignored - never crashes."""
    header = "bytes=123-4567"
    for n in range(len(header) + 1):
        result = parse_range(header[:n], 10_000)
        assert result is None or (0 <= result[0] <= result[1] < 10_000)
    assert parse_range(header, 10_000) == (123, 4567)
