"""Task identity: filtered URLs, headers given as text, and task ids."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from dfly.errors import DflyError

# Headers that describe one hop or one request shape, never the file itself.
HOP_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "range",
        "if-range",
        "content-length",
        "accept-encoding",
    }
)


def check_url(url: str) -> str:
    """Return C{url} if it is an absolute http(s) URL without credentials, else raise
    L{DflyError} (whose message never holds the credentials)."""
    try:
        url.encode("utf-8")
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except (UnicodeError, ValueError):
        raise DflyError(f"not a valid URL: {redact_url(url)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c in url for c in " \t\r\n"):
        raise DflyError(f"not an http(s) URL: {redact_url(url)!r}")
    if "@" in parts.netloc:
        # Clients turn user:password into a header (url_credentials); none travels in a URL.
        raise DflyError(f"credentials in the URL {redact_url(url)!r}: send them as an Authorization header")
    return url


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redact_url(url: str) -> str:
    """C{url} with any C{user:password@} replaced by C{***@}: for logs and messages."""
    return _USERINFO.sub(r"\1***@", url, count=1)


def url_credentials(url: str, lines: list[str]) -> tuple[str, list[str]]:
    """Move the C{user:password@} of an http(s) URL into an C{Authorization: Basic} header.

    Returns the URL without them and the header lines with that header added, so the
    credentials are part of the task's identity exactly as C{--header 'Authorization: ...'}
    is (L{credential_key}).  The user and password are percent-decoded and sent as UTF-8
    (RFC 7617).  Raises L{DflyError} if C{lines} already has an C{Authorization} header.  A URL
    without credentials, or one that is not valid, is returned unchanged (L{check_url} judges it).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, lines
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return url, lines
    userinfo, _, hostport = parts.netloc.rpartition("@")
    bare = urlunsplit(parts._replace(netloc=hostport))
    if not userinfo:
        return bare, lines
    if any(name.lower() == "authorization" for name, _ in parse_header_lines(lines)):
        raise DflyError("credentials given twice: in the URL and in an Authorization header")
    user, _, password = userinfo.partition(":")
    try:
        pair = f"{unquote(user, errors='strict')}:{unquote(password, errors='strict')}".encode()
    except UnicodeError:
        raise DflyError(f"credentials in the URL {redact_url(url)!r} are not UTF-8") from None
    return bare, [*lines, "Authorization: Basic " + base64.b64encode(pair).decode("ascii")]


def filter_url(url: str, keys: list[str] | tuple[str, ...]) -> str:
    """C{url} without the query parameters whose names are in C{keys}, and without a
    fragment (never sent to the origin, so it names the same file)."""
    if "#" in url:
        url = url.split("#", 1)[0]
    if not keys:
        return url
    parts = urlsplit(url)
    if not parts.query:
        return url
    drop = set(keys)
    kept = [p for p in parts.query.split("&") if p and p.split("=", 1)[0] not in drop]
    return urlunsplit(parts._replace(query="&".join(kept)))


# Headers that carry a client's credentials: clients with different ones never share a task,
# so nobody obtains through the swarm what the origin would refuse them.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})


def credential_key(lines: list[str]) -> str:
    """A digest of the credential headers among C{lines} ("" when there are none)."""
    creds = sorted(f"{n.lower()}:{v}" for n, v in parse_header_lines(lines) if n.lower() in CREDENTIAL_HEADERS)
    if not creds:
        return ""
    return hashlib.sha256("\n".join(creds).encode("utf-8")).hexdigest()[:32]


def task_id_for(task_url: str, sign: str = "", credentials: str = "") -> str:
    """The task id: one task for every client asking for the same filtered URL and sign
    with the same credentials.

    C{sign} is the expected md5 when one is given, else the identifier, else empty;
    C{credentials} is L{credential_key} of the client's headers.
    """
    data = b"dfly-task\0" + task_url.encode() + b"\0" + sign.encode()
    if credentials:
        data += b"\0" + credentials.encode()
    return hashlib.sha256(data).hexdigest()


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return C{digest} if it is C{sha256:} and 64 lower-case hex digits, else raise L{DflyError}."""
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise DflyError(f"not a sha256 digest: {str(digest)[:100]!r}")
    return digest


def digest_task_id(digest: str, scope: str = "") -> str:
    """The task id of content named by its digest: the same blob from any registry or
    repository is one task.  Content fetched with credentials is scoped to the origin
    (C{scheme://host:port}) that served it (see L{digest_scope}), so a request naming
    another host never joins that task; who may be served it is still decided by the
    peer, which asks that registry with the client's own credentials first."""
    key = check_digest(digest) if not scope else f"{check_digest(digest)}\0{scope}"
    return hashlib.sha256(b"dfly-digest\0" + key.encode()).hexdigest()


def digest_scope(url: str, lines: list[str]) -> str:
    """The scope of a digest task: C{""} (shared by every registry) for a request without
    credentials, else the URL's origin, C{scheme://host:port}.

    Without this a client could name any host that answers a C{HEAD} with 2xx or 3xx (its
    own server, or one that redirects everything) and be served a private blob another
    client fetched from its registry with credentials.  A request without credentials only
    joins the unscoped task, whose content some origin served without credentials."""
    if not credential_key(lines):
        return ""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def parse_header_lines(lines: list[str]) -> list[tuple[str, str]]:
    """Parse C{"Name: value"} strings; raises L{DflyError} on a line without a name."""
    out = []
    for line in lines:
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
            raise DflyError(f"bad header {line!r}: use 'Name: value'")
        try:
            name.encode("ascii")
            value.encode("latin-1")
        except UnicodeError:
            raise DflyError(f"bad header {line!r}: names must be ASCII, values Latin-1") from None
        out.append((name, value.strip()))
    return out


def origin_headers(lines: list[str]) -> dict[bytes, list[bytes]]:
    """Headers to send to the origin from a client's header lines (hop headers dropped)."""
    headers: dict[bytes, list[bytes]] = {}
    for name, value in parse_header_lines(lines):
        if name.lower() in HOP_HEADERS:
            continue
        headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
    return headers
