"""Shared fixtures.  Loopback fixtures start real processes and always stop them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dfly.devtools.swarm import Swarm


@pytest.fixture
def swarm(tmp_path: object) -> Iterator[Swarm]:
    """A loopback swarm under the test's temporary directory, stopped at teardown."""
    s = Swarm(os.path.join(str(tmp_path), "swarm"))
    try:
        yield s
    finally:
        codes = s.close()
        # A daemon that died on its own (rather than by our SIGTERM) is a bug worth seeing.
        crashed = {name: code for name, code in codes.items() if code not in (0, -15, None)}
        if crashed and not name_is_expected(crashed):
            for proc_name in crashed:
                print(Swarm.tail(os.path.join(s.root, f"{proc_name}.log")))
            pytest.fail(f"processes exited abnormally: {crashed}")


def name_is_expected(crashed: dict[str, int | None]) -> bool:
    """Processes a test killed on purpose are named 'killed-*'."""
    return all(name.startswith("killed-") for name in crashed)


@pytest.fixture
def files(tmp_path: object) -> str:
    """A directory for origin content."""
    path = os.path.join(str(tmp_path), "files")
    os.makedirs(path)
    return path


# -- real registries and clients (tests marked "registry") ----------------------------------


def image_cache_dir() -> str:
    """Where built test images are kept between runs (DFLY_CACHE, else the temp dir)."""
    import tempfile

    return os.environ.get("DFLY_CACHE") or os.path.join(tempfile.gettempdir(), "dfly-cache", "images")


@pytest.fixture(scope="session")
def standard_image() -> object:
    """The three-layer OCI image of real files (one layer is libLLVM, about 117 MB), built once."""
    from dfly.devtools.image import ImageError
    from dfly.devtools.image import standard_image as build

    try:
        return build(image_cache_dir())
    except ImageError as e:
        pytest.skip(f"cannot build the test image: {e}")


@pytest.fixture(scope="session")
def small_image() -> object:
    """A small two-layer OCI image of real files, built once."""
    from dfly.devtools.image import small_image as build

    return build(image_cache_dir())


@pytest.fixture(scope="session")
def test_hostnames() -> Iterator[dict[str, str]]:
    """registry.dfly.test and proxy.dfly.test resolve to 127.0.0.1 for the session.

    Go clients never send loopback addresses or "localhost" through a proxy, so registries
    are named by these names; the /etc/hosts line is removed at teardown."""
    from dfly.devtools.clients import HostsNotWritable, hosts_entry

    names = {"registry": "registry.dfly.test", "proxy": "proxy.dfly.test"}
    try:
        with hosts_entry(list(names.values())):
            yield names
    except HostsNotWritable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A throw-away CA and a server certificate for registry.dfly.test and 127.0.0.1."""
    from types import SimpleNamespace

    from dfly.devtools.pki import issue_server_cert, make_ca

    directory = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(directory)
    server = issue_server_cert(ca, directory, ["registry.dfly.test", "127.0.0.1"], stem="registry")
    # A certs directory as skopeo (--*-cert-dir) and containerd expect it: *.crt are CAs.
    certs_dir = os.path.join(directory, "certs.d")
    os.makedirs(certs_dir)
    with open(ca.cert_path, "rb") as src, open(os.path.join(certs_dir, "ca.crt"), "wb") as dst:
        dst.write(src.read())
    return SimpleNamespace(ca=ca, server=server, certs_dir=certs_dir)

