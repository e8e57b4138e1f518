"""Command-line options of the two twistd plugins and of dfget, and dfget's exit codes."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from memhelpers import FakeHttp
from twisted.application.service import IServiceMaker
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.web.server import Site

from dfly import dfget
from dfly.errors import (
    BadControlMessage,
    DflyError,
    DownloadTimeout,
    IntegrityError,
    NoSupernode,
    OriginError,
    PieceDigestMismatch,
    TaskFailed,
)
from dfly.peer import tap as peer_tap
from dfly.pieces import MIB
from dfly.supernode import tap as sn_tap
from dfly.wire.protocol import FramedFactory


def parse(cls: type, argv: list[str]) -> Any:
    opts = cls()
    opts.parseOptions(argv)
    return opts


def squash(text: str) -> str:
    return " ".join(text.split())


# -- dfly-supernode --------------------------------------------------------------------


def test_supernode_defaults() -> None:
    """With no arguments the supernode listens on 8002 (peers) and 127.0.0.1:8001 (API), picks
    piece sizes automatically, uses the documented limits, and has an absolute home."""
    opts = parse(sn_tap.Options, [])
    assert opts["port"] == "tcp:8002"
    assert opts["api"] == "tcp:8001:interface=127.0.0.1"
    assert opts["piece-size"] is None
    assert (opts["cdn-limit"], opts["up-limit"], opts["down-limit"]) == (4, 1, 1)
    assert (opts["blacklist-limit"], opts["isolation-limit"]) == (3, 5)
    assert (opts["no-relay"], opts["relay-depth"]) == (0, 32)
    assert opts["origin-timeout"] == 60.0
    assert opts["ready-file"] is None
    assert os.path.isabs(opts["home"])
    assert opts["home"].endswith(os.path.join("dfly", "supernode"))


def test_supernode_overrides(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option can be overridden; numbers are converted, --piece-size is in MiB and a
    relative --home is made absolute."""
    monkeypatch.chdir(tmp_path)
    opts = parse(
        sn_tap.Options,
        [
            "--port",
            "tcp:0",
            "-a",
            "tcp:0",
            "--home",
            "state",
            "--piece-size",
            "15",
            "--cdn-limit",
            "2",
            "--up-limit",
            "7",
            "--down-limit",
            "1",
            "--blacklist-limit",
            "9",
            "--isolation-limit",
            "8",
            "--no-relay",
            "--relay-depth",
            "3",
            "--origin-timeout",
            "2.5",
            "--ready-file",
            "ready.json",
        ],
    )
    assert (opts["port"], opts["api"]) == ("tcp:0", "tcp:0")
    assert opts["home"] == str(tmp_path / "state")
    assert opts["piece-size"] == 15 * MIB
    assert (opts["cdn-limit"], opts["up-limit"], opts["down-limit"]) == (2, 7, 1)
    assert (opts["blacklist-limit"], opts["isolation-limit"]) == (9, 8)
    assert (opts["no-relay"], opts["relay-depth"]) == (1, 3)
    assert opts["origin-timeout"] == 2.5
    assert opts["ready-file"] == "ready.json"


@pytest.mark.parametrize(
    "argv",
    [
        ["--piece-size", "0"],
        ["--piece-size", "16"],
        ["--piece-size", "4.5"],
        ["--piece-size", "big"],
        ["--cdn-limit", "0"],
        ["--up-limit", "-1"],
        ["--down-limit", "x"],
        ["--blacklist-limit", "1.5"],
        ["--isolation-limit", "-3"],
        ["--relay-depth", "0"],
        ["--origin-timeout", "0"],
        ["--origin-timeout", "-2"],
        ["--no-such-option"],
    ],
)
def test_supernode_bad_values(argv: list[str]) -> None:
    """Out-of-range or non-numeric values are usage errors, not tracebacks."""
    with pytest.raises(usage.UsageError):
        parse(sn_tap.Options, argv)


def test_supernode_help_has_longdesc() -> None:
    """The --help text contains the long description and names the options."""
    text = str(sn_tap.Options())
    assert squash(sn_tap.Options.longdesc) in squash(text)
    for name in ("--piece-size", "--cdn-limit", "--origin-timeout", "--ready-file"):
        assert name in text


def test_supernode_make_service(tmp_path: Any) -> None:
    """makeService builds a scheduler and CDN from the options; starting it listens for peers
    with framed connections and for the API with a web Site, then writes the ready file."""
    ready = tmp_path / "ready.json"
    opts = parse(
        sn_tap.Options,
        [
            "--home",
            str(tmp_path / "home"),
            "--port",
            "tcp:0",
            "--api",
            "tcp:0",
            "--cdn-limit",
            "2",
            "--down-limit",
            "3",
            "--ready-file",
            str(ready),
        ],
    )
    reactor = MemoryReactorClock()
    service: Any = sn_tap.makeService(opts, reactor=reactor, http=FakeHttp())
    assert os.path.isdir(tmp_path / "home")
    assert (service.node.scheduler.cdn_limit, service.node.scheduler.down_limit) == (2, 3)
    service.startService()
    try:
        factories = [entry[1] for entry in reactor.tcpServers]
        assert isinstance(factories[0], FramedFactory) and isinstance(factories[1], Site)
        assert service.ready.called
        info = json.loads(ready.read_text())
        assert set(info) == {"port", "api", "pid"} and info["pid"] == os.getpid()
    finally:
        service.stopService()


# -- dfly-peer -------------------------------------------------------------------------------


def test_peer_defaults() -> None:
    """With no arguments the peer uploads on 15001, uses the supernode at 127.0.0.1:8002,
    expires files after 600 s and gives up a silent source after 30 s."""
    opts = parse(peer_tap.Options, [])
    assert opts["port"] == "tcp:15001"
    assert opts["supernode"] == [("127.0.0.1", 8002)]
    assert opts["expire"] == 600.0
    assert opts["stall-timeout"] == 30.0
    assert opts["advertise-host"] is None
    assert os.path.isabs(opts["home"])
    assert opts["home"].endswith(os.path.join("dfly", "peer"))


def test_peer_overrides(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--supernode repeats and keeps its order (default port 8002 when omitted, IPv6 in
    brackets); the other options override their defaults."""
    monkeypatch.chdir(tmp_path)
    opts = parse(
        peer_tap.Options,
        [
            "--supernode",
            "sn1.example:9000",
            "--supernode",
            "sn2.example",
            "--supernode",
            "[::1]:7000",
            "-p",
            "tcp:0",
            "-d",
            "peerhome",
            "--advertise-host",
            "203.0.113.5",
            "--expire",
            "1.5",
            "--stall-timeout",
            "4",
        ],
    )
    assert opts["supernode"] == [("sn1.example", 9000), ("sn2.example", 8002), ("::1", 7000)]
    assert opts["port"] == "tcp:0"
    assert opts["home"] == str(tmp_path / "peerhome")
    assert opts["advertise-host"] == "203.0.113.5"
    assert (opts["expire"], opts["stall-timeout"]) == (1.5, 4.0)


def test_peer_options_do_not_share_state() -> None:
    """Two Options instances do not share the --supernode list."""
    first = parse(peer_tap.Options, ["--supernode", "a:1"])
    second = parse(peer_tap.Options, [])
    assert first["supernode"] == [("a", 1)]
    assert second["supernode"] == [("127.0.0.1", 8002)]


@pytest.mark.parametrize(
    "argv",
    [
        ["--supernode", "host:99999"],
        ["--supernode", "host:0"],
        ["--supernode", "bad host"],
        ["--expire", "0"],
        ["--expire", "-5"],
        ["--stall-timeout", "soon"],
        ["--stall-timeout", "-1"],
    ],
)
def test_peer_bad_values(argv: list[str]) -> None:
    """Bad addresses and non-positive durations are usage errors."""
    with pytest.raises(usage.UsageError):
        parse(peer_tap.Options, argv)


def test_peer_help_has_longdesc() -> None:
    """The --help text contains the long description and documents --supernode."""
    text = str(peer_tap.Options())
    assert squash(peer_tap.Options.longdesc) in squash(text)
    assert "--supernode" in text and "repeatable" in text


def test_plugins_registered() -> None:
    """twistd finds both service makers, whose options are the tap modules' Options."""
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert "dfly-supernode" in makers and "dfly-peer" in makers
    assert isinstance(makers["dfly-supernode"].options(), sn_tap.Options)
    assert isinstance(makers["dfly-peer"].options(), peer_tap.Options)


# -- dfget -------------------------------------------------------------------------------------


def test_dfget_url_first_then_options() -> None:
    """The URL may come before the options; defaults are filled in."""
    opts = parse(dfget.Options, ["http://example.com/dir/file.iso", "-o", "out.iso", "-q"])
    assert opts["url"] == "http://example.com/dir/file.iso"
    assert opts["output"] == "out.iso"
    assert opts["quiet"] is True
    assert opts["header"] == [] and opts["supernode"] == [] and opts["filters"] == []
    assert opts["md5"] is None and opts["timeout"] is None and opts["home"] is None


def test_dfget_options_then_url() -> None:
    """Options before the URL work too, including -s HOST:PORT and --timeout."""
    opts = parse(
        dfget.Options, ["-s", "sn:9", "-e", "2.5", "--no-back-source", "--json", "https://h/x"]
    )
    assert opts["supernode"] == [("sn", 9)]
    assert opts["timeout"] == 2.5
    assert opts["no-back-source"] is True and opts["json"] is True
    assert opts["output"] == "x"


def test_dfget_repeated_header() -> None:
    """-H/--header repeats, keeping every value in order."""
    opts = parse(
        dfget.Options, ["http://h/f", "-H", "X-A: 1", "--header", "Authorization: Bearer t"]
    )
    assert opts["header"] == ["X-A: 1", "Authorization: Bearer t"]


def test_dfget_filter_list() -> None:
    """--filter 'a&b' becomes the list of keys, empty parts dropped."""
    assert parse(dfget.Options, ["http://h/f", "--filter", "a&b"])["filters"] == ["a", "b"]
    assert parse(dfget.Options, ["http://h/f", "-f", "&token&&"])["filters"] == ["token"]


def test_dfget_md5_lowercased() -> None:
    """An md5 given in upper case is accepted and stored in lower case."""
    opts = parse(dfget.Options, ["http://h/f", "--md5", "D41D8CD98F00B204E9800998ECF8427E"])
    assert opts["md5"] == "d41d8cd98f00b204e9800998ecf8427e"


@pytest.mark.parametrize(
    "url, name",
    [
        ("http://h/dir/file.tar.gz", "file.tar.gz"),
        ("http://h/dir/file.tar.gz?sig=abc&x=/y", "file.tar.gz"),
        ("https://h/dir/sub/", "sub"),
    ],
)
def test_dfget_default_output(url: str, name: str) -> None:
    """Without -o the output is named after the last segment of the URL's path."""
    assert parse(dfget.Options, [url])["output"] == name


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-o", "x"],
        ["ftp://h/f"],
        ["file:///etc/passwd"],
        ["not a url"],
        ["http://h/f", "--home", "/tmp/x", "--supernode", "sn:1"],
        ["http://h/f", "--md5", "abc"],
        ["http://h/f", "--md5", "g" * 32],
        ["http://h/f", "-H", "no colon"],
        ["http://h/f", "-e", "0"],
        ["http://h/f", "-s", "sn:70000"],
        ["http://h/f", "--bogus"],
        ["http://h/f", "http://h/g"],
    ],
    ids=[
        "missing-url",
        "only-options",
        "ftp",
        "file",
        "garbage-url",
        "home-and-supernode",
        "short-md5",
        "non-hex-md5",
        "bad-header",
        "zero-timeout",
        "bad-port",
        "unknown-option",
        "two-urls",
    ],
)
def test_dfget_usage_errors(argv: list[str]) -> None:
    """Each misuse is a usage.UsageError (exit status 2), never SystemExit or a traceback."""
    with pytest.raises(usage.UsageError):
        parse(dfget.Options, argv)


def test_dfget_version_needs_no_url() -> None:
    """--version alone is valid."""
    assert parse(dfget.Options, ["--version"])["version"] is True


def test_dfget_main_usage_exit(capsys: pytest.CaptureFixture[str]) -> None:
    """dfget's main turns a usage error into exit status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as info:
        dfget.main(["ftp://h/f"])
    assert info.value.code == dfget.EXIT_USAGE == 2
    assert capsys.readouterr().err.startswith("dfget: ")


@pytest.mark.parametrize(
    "error, code",
    [
        (OriginError("404", 404), 3),
        (TaskFailed("gave up"), 1),
        (IntegrityError("bad md5"), 4),
        (DownloadTimeout("slow"), 5),
        (OSError("disk full"), 6),
        (PermissionError("read-only"), 6),
        (FileNotFoundError("gone"), 6),
        (NoSupernode("none"), 7),
        (DflyError("other"), 1),
        (BadControlMessage("weird"), 1),
        (PieceDigestMismatch("md5"), 1),
        (CancelledError(), 1),
        (ValueError("bug"), 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_exit_codes(error: BaseException, code: int) -> None:
    """Each kind of failure maps to its documented exit status."""
    assert dfget.exit_code(error) == code


def test_exit_code_constants() -> None:
    """The exit statuses are the ones the --help epilog documents."""
    assert (dfget.EXIT_OK, dfget.EXIT_FAILED, dfget.EXIT_USAGE, dfget.EXIT_ORIGIN) == (0, 1, 2, 3)
    assert (
        dfget.EXIT_INTEGRITY,
        dfget.EXIT_TIMEOUT,
        dfget.EXIT_OUTPUT,
        dfget.EXIT_NO_SUPERNODE,
    ) == (4, 5, 6, 7)
    for n, word in [(3, "origin"), (4, "integrity"), (5, "timeout"), (7, "no supernode")]:
        assert f"{n} {word}" in dfget.EPILOG


def test_peer_proxy_defaults() -> None:
    """The proxy listens on 127.0.0.1:65001 by default, with no default registry, the
    signed-URL parameters filtered and a 5 s fallback."""
    opts = parse(peer_tap.Options, [])
    assert opts["proxy"] == "tcp:65001:interface=127.0.0.1"
    assert opts["registry"] is None and opts["registry-allow"] == [] and opts["p2p-rule"] == []
    assert "X-Amz-Signature" in opts["filter-param"] and opts["fallback-after"] == 5.0


def test_peer_proxy_options() -> None:
    """--proxy none turns it off; --registry loses its trailing slash; the repeatable
    options accumulate; --filter-param none clears the defaults before adding."""
    opts = parse(
        peer_tap.Options,
        [
            "--proxy", "none", "--registry", "http://127.0.0.1:5000/",
            "--registry-allow", "ghcr.io", "--registry-allow", "http://127.0.0.1:5001",
            "--p2p-rule", r"\.iso$", "--p2p-rule", "/files/",
            "--filter-param", "none", "--filter-param", "token",
            "--fallback-after", "0.5", "--upstream-timeout", "9",
        ],
    )
    assert opts["proxy"] is None and opts["registry"] == "http://127.0.0.1:5000"
    assert opts["registry-allow"] == ["ghcr.io", "http://127.0.0.1:5001"]
    assert opts["p2p-rule"] == [r"\.iso$", "/files/"] and opts["filter-param"] == ["token"]
    assert (opts["fallback-after"], opts["upstream-timeout"]) == (0.5, 9.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--registry", "127.0.0.1:5000"],
        ["--registry-allow", "ftp://x"],
        ["--p2p-rule", "(unclosed"],
        ["--fallback-after", "0"],
        ["--upstream-timeout", "-1"],
    ],
)
def test_peer_bad_proxy_values(argv: list[str]) -> None:
    """Bad registry URLs, allow-list entries, rules and durations are usage errors."""
    with pytest.raises(usage.UsageError):
        parse(peer_tap.Options, argv)


def test_peer_proxy_options_documented() -> None:
    """Every proxy option appears in --help with its explanation."""
    text = squash(str(peer_tap.Options()))
    for name in ("--proxy", "--registry", "--registry-allow", "--p2p-rule", "--filter-param",
                 "--fallback-after", "--upstream-timeout"):
        assert name in text
    assert "allow" in text and "Regex" in text


def test_dfget_request_size_limit_matches_the_peer(tmp_path: Any) -> None:
    """dfget refuses, as a usage error naming the size, exactly the requests its peer would
    refuse as too large for a control frame, and accepts one byte less."""
    from dfly.peer.node import DownloadRequest, PeerNode

    def argv(n: int) -> list[str]:
        return ["http://h/f", "-H", "X-A: " + "a" * n]

    base = dfget.request_size(parse(dfget.Options, argv(0)))
    fits = dfget.REQUEST_LIMIT - base
    opts = parse(dfget.Options, argv(fits))
    assert dfget.request_size(opts) == dfget.REQUEST_LIMIT
    with pytest.raises(usage.UsageError, match=r"request too large \(61441 bytes of URL and headers"):
        parse(dfget.Options, argv(fits + 1))
    node = PeerNode(MemoryReactorClock(), str(tmp_path / "peer"), [("127.0.0.1", 1)])
    errors: list[str] = []
    for n in (fits, fits + 1):
        d = node.download(DownloadRequest("http://h/f", ["X-A: " + "a" * n]))
        d.addErrback(lambda f: errors.append(f.getErrorMessage()))
    assert errors == ["request too large (61441 bytes of URL and headers)"]
    node.stop()


def test_dfget_output_in_a_directory_is_named_after_the_url(tmp_path: Any) -> None:
    """-o naming an existing directory (or ending in a slash) puts the file there, named
    after the URL's last path segment, as with no -o in the current directory."""
    d = tmp_path / "downloads"
    d.mkdir()
    opts = parse(dfget.Options, ["http://h/a/layer.tar?sig=1", "-o", str(d)])
    assert opts["output"] == str(d / "layer.tar")
    opts = parse(dfget.Options, ["http://h/a/layer.tar", "-o", str(tmp_path / "new") + os.sep])
    assert opts["output"] == str(tmp_path / "new" / "layer.tar")
    with pytest.raises(usage.UsageError):
        parse(dfget.Options, ["http://h/", "-o", str(d)])
