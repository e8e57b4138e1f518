"""The tools of the registry tests, on their own: image builder, token server, hosts entry, config."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tarfile

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from treq.testing import StubTreq

from dfly.devtools.clients import hosts_entry
from dfly.devtools.distribution import TokenAuth, registry_config, write_htpasswd
from dfly.devtools.image import MEDIA_LAYER, MEDIA_LAYER_GZIP, ImageError, LayerSpec, build_image
from dfly.devtools.pki import make_ca
from dfly.devtools.tokenserver import TokenResource, parse_scopes


def some_files(tmp_path: object, count: int = 3) -> tuple[str, ...]:
    d = os.path.join(str(tmp_path), "src", "data")
    os.makedirs(d, exist_ok=True)
    paths = []
    for i in range(count):
        p = os.path.join(d, f"f{i}.bin")
        with open(p, "wb") as f:
            f.write(os.urandom(1000 + i * 5000))
        paths.append(p)
    return tuple(paths)


def test_image_is_reproducible_cached_and_holds_the_files(tmp_path: object) -> None:
    """Two builds of the same files in two caches give the same digests; a second build in the
    same cache reuses the layout untouched; each layer blob's sha256 is its digest, the config
    lists the uncompressed layers' digests, and the tar holds the files' exact bytes."""
    files = some_files(tmp_path)
    specs = [LayerSpec(files[:1]), LayerSpec(files[1:], compress=False)]
    a = build_image(os.path.join(str(tmp_path), "cache-a"), specs, tag="t")
    b = build_image(os.path.join(str(tmp_path), "cache-b"), specs, tag="t")
    assert a.manifest.digest == b.manifest.digest and [x.digest for x in a.layers] == [x.digest for x in b.layers]
    stamp = os.stat(a.blob_path(a.layers[1])).st_mtime_ns
    again = build_image(os.path.join(str(tmp_path), "cache-a"), specs, tag="t")
    assert again.layout == a.layout and os.stat(a.blob_path(a.layers[1])).st_mtime_ns == stamp
    assert [x.media_type for x in a.layers] == [MEDIA_LAYER_GZIP, MEDIA_LAYER]
    for blob in [a.manifest, *a.blobs]:
        with open(os.path.join(a.layout, "blobs", "sha256", blob.hex), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == blob.hex
    with open(a.blob_path(a.config)) as f:
        config = json.load(f)
    with open(a.blob_path(a.layers[1]), "rb") as f:
        assert config["rootfs"]["diff_ids"][1] == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    with tarfile.open(a.blob_path(a.layers[1])) as tar:
        for path in files[1:]:
            member = tar.extractfile(path.lstrip("/"))
            assert member is not None
            with open(path, "rb") as f:
                assert member.read() == f.read()
    with open(os.path.join(a.layout, "index.json")) as f:
        index = json.load(f)
    assert index["manifests"][0]["digest"] == a.manifest.digest
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "t"


def test_image_with_a_missing_file_is_a_clear_error(tmp_path: object) -> None:
    """A layer naming a file that is not there raises ImageError naming it; nothing is cached."""
    cache = os.path.join(str(tmp_path), "cache")
    with pytest.raises(ImageError, match="nope"):
        build_image(cache, [LayerSpec(("/nonexistent/nope",))])
    assert not os.path.exists(cache) or not os.listdir(cache)


def test_scopes_are_parsed_as_the_registry_sends_them() -> None:
    """repository:NAME:ACTIONS, several per parameter, names with slashes and a port-like colon."""
    assert parse_scopes(["repository:a/b:pull,push repository:c:pull", "registry:catalog:*"]) == [
        ("repository", "a/b", ["pull", "push"]),
        ("repository", "c", ["pull"]),
        ("registry", "catalog", ["*"]),
    ]
    assert parse_scopes(["garbage", ""]) == []


def decode_jwt(token: str, key: rsa.RSAPublicKey) -> tuple[dict[str, object], dict[str, object]]:
    def unb64(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    head, claims, sig = token.split(".")
    key.verify(unb64(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return json.loads(unb64(head)), json.loads(unb64(claims))


@pytest_twisted.ensureDeferred
async def test_token_server_grants_only_what_the_user_may(tmp_path: object) -> None:
    """alice (pull) asking for pull,push gets a signed RS256 token with pull only, audience and
    issuer set and her certificate as x5c; anonymous gets a token with no actions; a wrong
    password gets 401; the OAuth2 password grant (POST) works as the GET does."""
    signer = make_ca(str(tmp_path), "signer", stem="signer")
    users = {"alice": {"password": "pw", "actions": ["pull"]}}
    treq = StubTreq(TokenResource(signer.key, signer.cert, users, "iss-x"))
    auth = "Basic " + base64.b64encode(b"alice:pw").decode()
    r = await treq.get("http://t/token?service=svc&scope=repository:a/b:pull,push", headers={"Authorization": auth})
    assert r.code == 200
    token = (await r.json())["token"]
    head, claims = decode_jwt(token, signer.key.public_key())
    assert head["alg"] == "RS256" and isinstance(head["x5c"], list) and len(head["x5c"]) == 1
    assert claims["aud"] == "svc" and claims["iss"] == "iss-x" and claims["sub"] == "alice"
    assert claims["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull"]}]

    r = await treq.get("http://t/token?service=svc&scope=repository:a/b:pull")
    _, claims = decode_jwt((await r.json())["token"], signer.key.public_key())
    assert claims["sub"] == "" and claims["access"] == [{"type": "repository", "name": "a/b", "actions": []}]

    bad = "Basic " + base64.b64encode(b"alice:nope").decode()
    r = await treq.get("http://t/token?service=svc", headers={"Authorization": bad})
    assert r.code == 401
    await r.content()

    r = await treq.post(
        "http://t/token",
        data=b"grant_type=password&username=alice&password=pw&service=svc&scope=repository:a/b:pull",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    _, claims = decode_jwt((await r.json())["token"], signer.key.public_key())
    assert claims["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull"]}]
    r = await treq.get("http://t/_stats")
    assert (await r.json()) == {"issued": {"alice": 2, "(anonymous)": 1}, "refused": 1}


def test_hosts_entry_removes_only_its_own_line(tmp_path: object) -> None:
    """The entry is there inside the block and gone after it; lines others added meanwhile stay."""
    path = os.path.join(str(tmp_path), "hosts")
    with open(path, "w") as f:
        f.write("127.0.0.1 localhost\n")
    with hosts_entry(["a.test", "b.test"], path=path) as line:
        with open(path) as f:
            assert line in f.read()
        with open(path, "a") as f:
            f.write("10.0.0.1 other\n")
    with open(path) as f:
        assert f.read() == "127.0.0.1 localhost\n10.0.0.1 other\n"


def test_registry_config_sections(tmp_path: object) -> None:
    """TLS, htpasswd (bcrypt hashes) and token settings land where distribution reads them."""
    import bcrypt

    htpasswd = os.path.join(str(tmp_path), "htpasswd")
    write_htpasswd(htpasswd, {"alice": "pw"})
    with open(htpasswd) as f:
        name, hashed = f.read().strip().split(":", 1)
    assert name == "alice" and hashed.startswith("$2") and bcrypt.checkpw(b"pw", hashed.encode())
    c = registry_config(str(tmp_path), 5000, htpasswd_file=htpasswd)
    assert c["http"]["addr"] == "127.0.0.1:5000" and c["auth"]["htpasswd"]["path"] == htpasswd
    token = TokenAuth("http://127.0.0.1:1/token", "svc", "iss", "/b.pem")
    c = registry_config(str(tmp_path), 5000, token=token)
    assert c["auth"]["token"] == {"realm": token.realm, "service": "svc", "issuer": "iss", "rootcertbundle": "/b.pem"}
    assert c["log"]["formatter"] == "json"
    with pytest.raises(ValueError):
        registry_config(str(tmp_path), 5000, htpasswd_file=htpasswd, token=token)
