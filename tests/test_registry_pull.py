"""Real clients pull a real image through three peer daemons, and the registry sends it once.

Everything here is real: the distribution registry (TLS, certificate from a throw-away CA),
a three-layer OCI image of installed files (one layer is libLLVM, about 117 MB), skopeo and
containerd's ctr as clients, the supernode and the peer daemons as C{twistd -n} processes.
The clients are configured with the snippets in C{etc/} (after the substitutions their comments
document).  The registry's egress is measured from its own log: distribution logs every
response with the bytes written (C{http.response.written}), summed over blob C{GET}s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from registryenv import (
    certs_dir_with,
    peer_ca,
    require_programs,
    snippet,
    start_proxy_peer,
    systemd_environment,
)

from dfly.devtools.clients import Containerd, check_dir_blobs, skopeo
from dfly.devtools.distribution import start_registry
from dfly.devtools.image import Image
from dfly.devtools.swarm import Swarm

pytestmark = [pytest.mark.registry, pytest.mark.loopback]

HIJACK = r"^registry\.dfly\.test(:[0-9]+)?$"
CLIENT_AGENTS = ("skopeo", "containerd", "Go-http-client")


def push(image: Image, ref: str, certs_dir: str) -> None:
    p = skopeo(["copy", "--preserve-digests", "--dest-cert-dir", certs_dir, image.oci_ref(), f"docker://{ref}"], timeout=180)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, standard_image: Image, small_image: Image, test_hostnames: dict[str, str], test_pki: Any
) -> Iterator[SimpleNamespace]:
    """A TLS registry holding both test images, a supernode and three proxy peers:
    C{mirror} (mirror mode for the registry), C{hijack} (forward proxy intercepting the
    registry's TLS, and mirror mode too) and C{ctr} (mirror for containerd's ?ns=), and a
    containerd daemon."""
    require_programs("docker-registry", "skopeo", "containerd", "ctr")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    root = str(tmp_path_factory.mktemp("registry-pull"))
    swarm = Swarm(os.path.join(root, "swarm"))
    ctrd: Containerd | None = None
    ca = test_pki.ca.cert_path
    try:
        reg = start_registry(swarm, "registry", host=test_hostnames["registry"], tls=test_pki.server, ca_file=ca)
        push(standard_image, f"{reg.hostport}/big/app:v1", test_pki.certs_dir)
        push(small_image, f"{reg.hostport}/small/app:v1", test_pki.certs_dir)
        swarm.start_supernode("--origin-ca", ca)
        mirror, mirror_port = start_proxy_peer(swarm, "mirror", "--registry", reg.url, "--upstream-ca", ca)
        hijack, hijack_port = start_proxy_peer(
            swarm, "hijack", "--hijack", HIJACK, "--registry", reg.url, "--upstream-ca", ca
        )
        ctr_peer, ctr_port = start_proxy_peer(swarm, "ctr", "--registry-allow", reg.hostport, "--upstream-ca", ca)
        ctrd = Containerd(swarm)
        yield SimpleNamespace(
            root=root, swarm=swarm, reg=reg, ctrd=ctrd, proxy_host=test_hostnames["proxy"],
            mirror=mirror, mirror_port=mirror_port, hijack=hijack, hijack_port=hijack_port,
            ctr_peer=ctr_peer, ctr_port=ctr_port,
            dfly_certs=certs_dir_with(peer_ca(hijack), os.path.join(root, "dfly-certs")),
        )
    finally:
        if ctrd is not None:
            ctrd.close()
        codes = swarm.close()
        prune_big_files(root)
        crashed = {n: c for n, c in codes.items() if c not in (0, -15, None)}
        assert not crashed, f"processes exited abnormally: {crashed}"


def prune_big_files(root: str, limit: int = 1 << 20) -> None:
    """Delete copies of the image (registry storage, peer stores, client outputs) after the
    module, keeping the logs: each run would otherwise leave about 1 GB behind."""
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith(".log") and os.path.isfile(path) and os.path.getsize(path) > limit:
                os.unlink(path)


def registries_conf(env: SimpleNamespace, name: str, text: str) -> str:
    path = os.path.join(env.root, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def assert_no_client_fetched_blobs(egress: dict[str, Any]) -> None:
    """Every blob GET the registry answered came from dfly, none from a client directly."""
    direct = [g for g in egress["blob_gets"] if g[3].startswith(CLIENT_AGENTS)]
    assert not direct, f"clients fetched blobs from the registry themselves: {direct}"


def test_three_peers_pull_the_image_once(env: SimpleNamespace, standard_image: Image) -> None:
    """skopeo through a registries.conf mirror (etc/containers/registries.conf), skopeo through
    HTTPS_PROXY with TLS interception (the proxies of etc/docker/daemon.json, trusting only the
    peer's CA) and ctr through a hosts.toml mirror (etc/containerd/...) pull the same 3-layer
    image at once through three peers: every blob arrives with the right sha256 (checked by the
    clients and again here), and the registry sends the image's blobs about once in all."""
    reg, image = env.reg, standard_image
    ref = f"{reg.hostport}/big/app:v1"
    mark = reg.log_size()

    mirror_conf = registries_conf(
        env, "mirror-registries.conf",
        snippet("containers/registries.conf", proxy=f"127.0.0.1:{env.mirror_port}", registry=reg.hostport),
    )
    daemon = json.loads(snippet("docker/daemon.json", proxy=f"127.0.0.1:{env.hijack_port}"))
    proxy_env = {
        "HTTP_PROXY": daemon["proxies"]["http-proxy"],
        "HTTPS_PROXY": daemon["proxies"]["https-proxy"],
        "NO_PROXY": daemon["proxies"]["no-proxy"],
    }
    hosts_dir = os.path.join(env.root, "hosts.d")
    os.makedirs(os.path.join(hosts_dir, reg.hostport))
    with open(os.path.join(hosts_dir, reg.hostport, "hosts.toml"), "w") as f:
        f.write(
            snippet(
                "containerd/certs.d/registry.example.com/hosts.toml",
                proxy=f"127.0.0.1:{env.ctr_port}",
                registry=reg.hostport,
            )
        )
    out_mirror = os.path.join(env.root, "out-mirror")
    out_proxy = os.path.join(env.root, "out-proxy")

    # The mirror client is given no CA for the registry and the proxy client only the peer's
    # CA: a silent fallback to the registry itself would fail, not pass.
    def run(which: str) -> subprocess.CompletedProcess[str]:
        if which == "mirror":
            return skopeo(["copy", f"docker://{ref}", f"dir:{out_mirror}"], registries_conf=mirror_conf, timeout=240)
        if which == "proxy":
            return skopeo(
                ["copy", "--src-cert-dir", env.dfly_certs, f"docker://{ref}", f"dir:{out_proxy}"], env=proxy_env, timeout=240
            )
        return env.ctrd.fetch(ref, hosts_dir, timeout=240)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = dict(zip(("mirror", "proxy", "ctr"), pool.map(run, ("mirror", "proxy", "ctr")), strict=True))
    for which, p in results.items():
        assert p.returncode == 0, f"{which} pull failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"

    check_dir_blobs(out_mirror, image)
    check_dir_blobs(out_proxy, image)
    env.ctrd.check_blobs(image)

    egress = reg.egress(mark)
    assert_no_client_fetched_blobs(egress)
    statuses = sorted(collections.Counter(str(g[1]) for g in egress["blob_gets"]).items())
    print(f"image blobs {image.blob_bytes} B; registry blob egress for 3 pulls {egress['blob_bytes']} B "
          f"({egress['blob_bytes'] / image.blob_bytes:.3f} x); blob GETs by status {statuses}")
    assert egress["blob_bytes"] <= 1.1 * image.blob_bytes
    # The layers did come from this registry (through the supernode), at least once.
    assert egress["blob_bytes"] >= max(b.size for b in image.layers)

    # The big layer is one swarm task that all three peers completed, and part of it went
    # from peer to peer (the supernode serves a piece only while no peer can).
    big = max(image.layers, key=lambda b: b.size)
    (task,) = [t for t in env.swarm.api()["tasks"] if big.hex in t["url"]]
    assert task["state"] == "done" and task["source_bytes"] == big.size
    assert len(task["peers"]) == 3 and all(p["done"] for p in task["peers"]), task["peers"]
    from_peers = sum(p["from_peers_bytes"] for p in task["peers"])
    print(f"big layer: {big.size} B from the registry once; {from_peers} B peer to peer, "
          f"{sum(p['from_cdn_bytes'] for p in task['peers'])} B from the supernode")
    assert from_peers > 0


def test_daemon_json_mirror(env: SimpleNamespace, small_image: Image) -> None:
    """etc/docker/daemon.json is valid JSON with registry-mirrors and proxies (http-proxy,
    https-proxy, no-proxy).  No Docker engine can run here, so skopeo is driven with exactly the
    values read from it: its registry-mirrors URL becomes the mirror of the registry (insecure as
    it is http), and the image arrives verified without the client touching the registry's blobs."""
    with open(os.path.join(os.path.dirname(__file__), "..", "etc", "docker", "daemon.json")) as f:
        raw = json.load(f)
    assert set(raw) >= {"registry-mirrors", "proxies"}
    assert set(raw["proxies"]) == {"http-proxy", "https-proxy", "no-proxy"}
    daemon = json.loads(snippet("docker/daemon.json", proxy=f"127.0.0.1:{env.hijack_port}"))
    (mirror_url,) = daemon["registry-mirrors"]
    mirror = urlsplit(mirror_url)
    reg = env.reg
    conf = (
        f'[[registry]]\nprefix = "{reg.hostport}"\nlocation = "{reg.hostport}"\n'
        f'[[registry.mirror]]\nlocation = "{mirror.netloc}"\ninsecure = {str(mirror.scheme == "http").lower()}\n'
    )
    mark = reg.log_size()
    out = os.path.join(env.root, "out-daemon-mirror")
    p = skopeo(["copy", f"docker://{reg.hostport}/small/app:v1", f"dir:{out}"], registries_conf=registries_conf(env, "daemon-mirror.conf", conf))
    assert p.returncode == 0, p.stderr
    check_dir_blobs(out, small_image)
    egress = reg.egress(mark)
    assert_no_client_fetched_blobs(egress)
    assert egress["blob_bytes"] <= 1.1 * small_image.blob_bytes


def test_systemd_drop_in_proxy(env: SimpleNamespace, small_image: Image) -> None:
    """The HTTP_PROXY / HTTPS_PROXY / NO_PROXY of etc/docker/http-proxy.conf, given to skopeo as
    they are (the proxy named proxy.dfly.test here), take an HTTPS pull through the peer's
    interception (the client trusts only the peer's CA), and the blobs arrive verified."""
    with open(os.path.join(os.path.dirname(__file__), "..", "etc", "docker", "http-proxy.conf")) as f:
        assert "[Service]" in f.read()
    proxy_env = systemd_environment(snippet("docker/http-proxy.conf", proxy=f"{env.proxy_host}:{env.hijack_port}"))
    assert set(proxy_env) == {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"}
    reg = env.reg
    mark = reg.log_size()
    out = os.path.join(env.root, "out-systemd-proxy")
    p = skopeo(["copy", "--src-cert-dir", env.dfly_certs, f"docker://{reg.hostport}/small/app:v1", f"dir:{out}"], env=proxy_env)
    assert p.returncode == 0, p.stderr
    check_dir_blobs(out, small_image)
    assert_no_client_fetched_blobs(reg.egress(mark))
