"""Where a proxy request goes, decided from the request line alone (no I/O).

Three ways in, one answer (a L{Target}: the upstream URL and how we got it):

- I{mirror}: an origin-form request (C{GET /v2/...}) to the proxy as if it were
  the registry.  The upstream is the configured registry, or the host named by
  containerd's C{?ns=HOST} parameter when that host is on the allow-list (the
  parameter is removed before forwarding).  An allow-list entry C{HOST[:PORT]}
  means https; C{http://HOST[:PORT]} means plain http.  C{ns=docker.io} stands
  for Docker Hub's registry host C{registry-1.docker.io}.
- I{forward}: an absolute-form request (C{GET http://host/path}) from an
  C{HTTP_PROXY} client.
- I{hijack}: an origin-form request decrypted from a CONNECT tunnel, which
  carries the tunnel's origin (C{https://host:port}) beside it.

Then L{blob_digest} says whether the path names a registry blob by digest and
L{P2PRules} whether a URL matches a configured rule; either one sends a C{GET}
through the swarm.  L{parse_range} reads a C{Range} header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dfly.errors import DflyError

# A repository name as the distribution spec defines it: lower-case components separated by
# single slashes.  Anything else (empty, "." or ".." components, percent-escapes) is not a
# blob path: the registry answers such a path with a redirect to its clean form before any
# auth check, and that 3xx must not pass for "this client may have the blob".
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
BLOB_PATH = re.compile(rf"/v2/({_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*)/blobs/(sha256:[0-9a-f]{{64}})")

# Query parameters of signed object-storage URLs (S3, GCS, Azure...): they change with every
# signature but name the same object, so they are not part of a task's identity.
DEFAULT_FILTER_PARAMS = (
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
    "X-Amz-Signature", "X-Amz-Security-Token", "X-Amz-User-Agent", "AWSAccessKeyId", "Signature",
    "Expires", "GoogleAccessId", "X-Goog-Algorithm", "X-Goog-Credential", "X-Goog-Date",
    "X-Goog-Expires", "X-Goog-SignedHeaders", "X-Goog-Signature", "sig", "se", "sp", "sv", "sr",
    "st", "spr", "skoid", "sktid", "skt", "ske", "sks", "skv", "ss", "srt",
)

DOCKER_HUB = "registry-1.docker.io"


class RouteError(DflyError):
    """The request cannot be routed; C{status} is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where a request goes: C{url} is absolute; C{mode} is mirror, forward or hijack."""

    url: str
    mode: str

    @property
    def origin(self) -> str:
        """C{scheme://host[:port]} of the upstream."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


def parse_allowed(entries: list[str]) -> dict[str, str]:
    """Allow-list entries (C{HOST[:PORT]}, C{http://HOST[:PORT]}, C{https://...}) as
    {host[:port] (lower case): scheme}."""
    allowed: dict[str, str] = {}
    for entry in entries:
        text = entry.strip()
        scheme = "https"
        if "://" in text:
            scheme, _, text = text.partition("://")
            scheme = scheme.lower()
            if scheme not in ("http", "https"):
                raise DflyError(f"registry allow-list entry {entry!r}: scheme must be http or https")
        host = text.rstrip("/").lower()
        if not host or "/" in host or any(c in host for c in " \t?#@"):
            raise DflyError(f"registry allow-list entry {entry!r} is not HOST[:PORT]")
        allowed[host] = scheme
    return allowed


def check_registry(url: str) -> str:
    """Return the default registry URL without a trailing slash (http(s) only)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise DflyError(f"--registry {url!r} is not an http(s) URL like https://registry.example")
    return url.rstrip("/")


def classify(
    uri: str,
    origin: str | None = None,
    registry: str | None = None,
    allowed: dict[str, str] | None = None,
) -> Target:
    """The target of a request whose request-target is C{uri}.

    C{origin} is the origin of a decrypted CONNECT tunnel (C{https://host:port}), C{registry}
    the default upstream of mirror requests, C{allowed} the hosts C{?ns=} may name
    (L{parse_allowed}).  Raises L{RouteError} with the status to answer.
    """
    if not uri or any(c in uri for c in " \t\r\n"):
        raise RouteError(400, "bad request target")
    if origin is not None:
        if not uri.startswith("/"):
            raise RouteError(400, "a request in a tunnel must be origin-form (/path)")
        return Target(origin.rstrip("/") + uri, "hijack")
    lowered = uri[:8].lower()
    if lowered.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        if not parts.hostname:
            raise RouteError(400, f"no host in {uri[:200]!r}")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise RouteError(400, f"bad port in {uri[:200]!r}") from None
        return Target(urlunsplit(parts._replace(fragment="")), "forward")
    if not uri.startswith("/"):
        raise RouteError(400, f"unsupported request target {uri[:200]!r}")
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ns = [v for k, v in query if k == "ns"]
    if ns:
        host = ns[-1].strip().lower()
        allowed = allowed or {}
        upstream_host = DOCKER_HUB if host == "docker.io" else host
        scheme = allowed.get(host) or allowed.get(upstream_host)
        if scheme is None:
            raise RouteError(403, f"registry {host!r} is not on this proxy's allow-list (--registry-allow)")
        kept = urlencode([(k, v) for k, v in query if k != "ns"])
        return Target(f"{scheme}://{upstream_host}{urlunsplit(('', '', parts.path, kept, ''))}", "mirror")
    if registry is None:
        raise RouteError(404, "no upstream registry configured (--registry) and no ?ns= given")
    return Target(registry + uri.split("#", 1)[0], "mirror")


def blob_digest(path: str) -> str | None:
    """The digest a C{/v2/<name>/blobs/sha256:<hex>} path names, else None."""
    m = BLOB_PATH.fullmatch(path)
    return m.group(2) if m else None


class P2PRules:
    """Regular expressions (searched in the whole URL) that send other files through the swarm."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = []
        for p in patterns:
            try:
                self.patterns.append(re.compile(p))
            except re.error as e:
                raise DflyError(f"--p2p-rule {p!r} is not a regular expression: {e}") from None

    def match(self, url: str) -> bool:
        return any(p.search(url) for p in self.patterns)


class RangeNotSatisfiable(DflyError):
    """A syntactically valid range that selects nothing of the file (answer 416)."""


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """C{(first, last)} (inclusive) of a single C{bytes=} range over C{length} bytes.

    None means "serve the whole file" (no header, another unit, several ranges, or a
    header we do not understand - RFC 9110 lets a server ignore Range).  Raises
    L{RangeNotSatisfiable} when the range selects nothing.
    """
    if header is None:
        return None
    text = header.strip()
    unit, sep, spec = text.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None
    first_text, dash, last_text = spec.partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or (first_text and not first_text.isdigit()) or (last_text and not last_text.isdigit()):
        return None
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or length == 0:
            raise RangeNotSatisfiable(f"suffix range of {suffix} bytes over {length}")
        return max(0, length - suffix), length - 1
    first = int(first_text)
    if last_text:
        last = int(last_text)
        if last < first:
            return None
        last = min(last, length - 1)
    else:
        last = length - 1
    if first >= length:
        raise RangeNotSatisfiable(f"range starts at {first}, the file has {length} bytes")
    return first, last
