"""Command-line options of the HTTPS features: the peer's hijack, CONNECT ports, CA directory
and upstream CA; the supernode's --origin-ca; dfget's --ca-file."""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.python import usage

from dfly import dfget
from dfly.peer import tap as peer_tap
from dfly.proxy.ca import generate_ca
from dfly.supernode import tap as sn_tap


def parse(cls: Any, argv: list[str]) -> Any:
    opts = cls()
    opts.parseOptions(argv)
    return opts


@pytest.fixture
def bundle(tmp_path: Any) -> str:
    path = os.path.join(str(tmp_path), "ca.pem")
    with open(path, "wb") as f:
        f.write(generate_ca()[0].public_bytes(serialization.Encoding.PEM))
    return path


def test_peer_tls_defaults() -> None:
    """By default nothing is hijacked, CONNECT may reach port 443 only, the CA lives in the
    home, and upstreams are checked against the system store."""
    opts = parse(peer_tap.Options, [])
    assert opts["hijack"] == []
    assert opts["connect-ports"] == frozenset({443})
    assert opts["ca-dir"] == opts["home"]
    assert opts["upstream-ca"] is None
    assert opts["connect-timeout"] == 30.0


def test_peer_tls_overrides(tmp_path: Any, bundle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--hijack repeats; --connect-ports takes a list or 'any'; paths become absolute."""
    monkeypatch.chdir(tmp_path)
    opts = parse(
        peer_tap.Options,
        ["--hijack", r"^a\.example$", "--hijack", ":5000$", "--connect-ports", "443,8443",
         "--ca-dir", "cadir", "--upstream-ca", os.path.basename(bundle), "--connect-timeout", "2.5"],
    )
    assert opts["hijack"] == [r"^a\.example$", ":5000$"]
    assert opts["connect-ports"] == frozenset({443, 8443})
    assert opts["ca-dir"] == str(tmp_path / "cadir")
    assert opts["upstream-ca"] == bundle
    assert opts["connect-timeout"] == 2.5
    assert parse(peer_tap.Options, ["--connect-ports", "any"])["connect-ports"] is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--hijack", "(unclosed"],
        ["--connect-ports", "https"],
        ["--connect-ports", "0"],
        ["--connect-ports", "70000"],
        ["--connect-timeout", "0"],
        ["--upstream-ca", "/nonexistent/ca.pem"],
    ],
)
def test_peer_tls_bad_values(argv: list[str]) -> None:
    """A bad regex, port list, timeout or unreadable CA bundle is a usage error."""
    with pytest.raises(usage.UsageError):
        parse(peer_tap.Options, argv)


def test_supernode_origin_ca(bundle: str, tmp_path: Any) -> None:
    """--origin-ca takes a readable PEM bundle; anything else is a usage error."""
    assert parse(sn_tap.Options, [])["origin-ca"] is None
    assert parse(sn_tap.Options, ["--origin-ca", bundle])["origin-ca"] == bundle
    empty = os.path.join(str(tmp_path), "empty.pem")
    open(empty, "w").close()
    for bad in (empty, "/nonexistent/ca.pem"):
        with pytest.raises(usage.UsageError, match="--origin-ca"):
            parse(sn_tap.Options, ["--origin-ca", bad])


def test_dfget_ca_file(bundle: str) -> None:
    """dfget --ca-file takes a readable PEM bundle; a missing one is a usage error."""
    opts = parse(dfget.Options, ["https://a.example/f", "--ca-file", bundle])
    assert opts["ca-file"] == bundle
    assert parse(dfget.Options, ["https://a.example/f"])["ca-file"] is None
    with pytest.raises(usage.UsageError, match="--ca-file"):
        parse(dfget.Options, ["https://a.example/f", "--ca-file", "/nonexistent/ca.pem"])
