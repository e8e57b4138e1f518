"""The proxy CA: generation, files, leaf minting (checked by OpenSSL), the leaf cache, dfly-ca,
and the HTTPS client policy's trust bundles."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from dfly.devtools.swarm import tool
from dfly.proxy.ca import (
    CertificateAuthority,
    CertificateAuthorityError,
    ca_paths,
    ensure_ca,
    generate_ca,
    load_ca,
    write_ca,
)
from dfly.tls import TrustStoreError, client_tls_policy, describe_tls_failure, load_ca_bundle


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _verify(leaf: x509.Certificate, *cas: x509.Certificate) -> None:
    store = crypto.X509Store()
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf)).verify_certificate()


def test_ca_certificate_extensions() -> None:
    """The CA is a CA: basicConstraints CA:TRUE (critical), keyCertSign and cRLSign only,
    a subject key identifier, and about ten years of validity."""
    cert, key = generate_ca()
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert cert.issuer == cert.subject


def test_leaf_for_a_dns_name_verifies_against_the_ca_only() -> None:
    """A minted leaf carries the host as a DNS subjectAltName, serverAuth, the CA's key id as
    authority key id; OpenSSL's store accepts it with the CA and rejects it with another CA."""
    cert, key = generate_ca()
    authority = CertificateAuthority(cert, key)
    leaf = authority.leaf("Registry.Example")
    lc = leaf.certificate
    san = lc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["registry.example"]
    eku = lc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = lc.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not lc.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    assert lc.not_valid_before_utc < now - datetime.timedelta(hours=23)
    assert now + datetime.timedelta(days=300) < lc.not_valid_after_utc <= cert.not_valid_after_utc
    _verify(leaf.certificate, cert)
    other, _ = generate_ca()
    with pytest.raises(crypto.X509StoreContextError):
        _verify(leaf.certificate, other)


def test_leaf_for_ip_addresses_uses_ip_entries() -> None:
    """IP literals (v4, and v6 with or without brackets) become IP subjectAltNames, not DNS."""
    authority = CertificateAuthority(*generate_ca())
    for host, ip in [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("::1", "::1")]:
        lc = authority.leaf(host).certificate
        san = lc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip)]
        assert san.get_values_for_type(x509.DNSName) == []


def test_openssl_cli_accepts_leaf_for_its_host_only(tmp_path: object) -> None:
    """The real openssl verifier, strict X.509 checks, purpose sslserver and hostname checking, accepts a leaf
    for the host it was minted for and refuses it for another host."""
    root = str(tmp_path)
    cert_path = write_ca(root)
    authority = CertificateAuthority.from_directory(root)
    leaf = authority.leaf("registry.example")
    leaf_path = os.path.join(root, "leaf.pem")
    with open(leaf_path, "wb") as f:
        f.write(_pem(leaf.certificate))
    base = ["openssl", "verify", "-x509_strict", "-CAfile", cert_path, "-purpose", "sslserver"]
    ok = subprocess.run([*base, "-verify_hostname", "registry.example", leaf_path], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([*base, "-verify_hostname", "other.example", leaf_path], capture_output=True, text=True)
    assert bad.returncode != 0


def test_write_ca_files_and_refusal(tmp_path: object) -> None:
    """write_ca writes ca.pem and a 0600 ca.key that load back as a matching pair; a second
    write is refused unless forced, and forcing makes a different CA."""
    root = os.path.join(str(tmp_path), "home")
    cert_path = write_ca(root)
    cert_file, key_file = ca_paths(root)
    assert cert_path == cert_file
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    first, _ = load_ca(root)
    with pytest.raises(CertificateAuthorityError, match="--force"):
        write_ca(root)
    assert load_ca(root)[0] == first
    write_ca(root, force=True)
    assert load_ca(root)[0] != first
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_load_ca_rejects_broken_files(tmp_path: object) -> None:
    """A missing CA, garbage, a key that is not the certificate's, or a non-CA certificate are
    clear errors, not crashes."""
    root = str(tmp_path)
    with pytest.raises(CertificateAuthorityError, match="cannot load"):
        load_ca(root)
    write_ca(root)
    cert_file, key_file = ca_paths(root)
    _, other_key = generate_ca()
    good_key = open(key_file, "rb").read()
    with open(key_file, "wb") as f:
        f.write(other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(CertificateAuthorityError, match="not the key"):
        load_ca(root)
    with open(key_file, "wb") as f:
        f.write(good_key)
    leaf = CertificateAuthority.from_directory(root).leaf("x.example").certificate
    with open(cert_file, "wb") as f:
        f.write(_pem(leaf))
    with pytest.raises(CertificateAuthorityError):
        load_ca(root)
    with open(cert_file, "wb") as f:
        f.write(b"not a certificate")
    with pytest.raises(CertificateAuthorityError, match="cannot load"):
        load_ca(root)


def test_ensure_ca_creates_once(tmp_path: object) -> None:
    """ensure_ca makes the CA the first time and reuses it afterwards."""
    root = str(tmp_path)
    path, created = ensure_ca(root)
    assert created and os.path.exists(path)
    first = open(path, "rb").read()
    path2, created2 = ensure_ca(root)
    assert (path2, created2) == (path, False)
    assert open(path, "rb").read() == first


def test_leaf_cache_is_lru_bounded() -> None:
    """server_options mints once per host while the host stays cached; the least recently used
    host is evicted beyond the bound and minted again when asked for."""
    authority = CertificateAuthority(*generate_ca(), cache_size=2)
    a = authority.server_options("a.example")
    assert authority.server_options("A.example") is a
    authority.server_options("b.example")
    authority.server_options("a.example")  # a is now the most recent
    authority.server_options("c.example")  # evicts b
    assert authority.cached_hosts() == ["a.example", "c.example"]
    assert authority.minted == 3
    authority.server_options("b.example")
    assert authority.minted == 4
    assert authority.server_options("c.example") is not None
    assert len(authority.cached_hosts()) == 2


def test_dfly_ca_command(tmp_path: object) -> None:
    """dfly-ca init prints the certificate path and how to trust it; a second init fails with
    a one-line reason and leaves the CA alone; --force replaces it; path prints it."""
    home = os.path.join(str(tmp_path), "peer")
    r = subprocess.run([tool("dfly-ca"), "init", "--home", home], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cert_path = os.path.join(home, "ca.pem")
    assert r.stdout.strip() == cert_path
    assert "--cacert" in r.stderr and "update-ca-certificates" in r.stderr
    first = open(cert_path, "rb").read()
    again = subprocess.run([tool("dfly-ca"), "init", "--home", home], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "--force" in again.stderr
    assert open(cert_path, "rb").read() == first
    forced = subprocess.run([tool("dfly-ca"), "init", "--home", home, "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and open(cert_path, "rb").read() != first
    shown = subprocess.run([tool("dfly-ca"), "path", "--home", home], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() == cert_path


def test_ca_bundle_loading(tmp_path: object) -> None:
    """A bundle of several CAs loads as a trust root; a missing or empty bundle is a
    TrustStoreError; without a bundle the system store is used."""
    root = str(tmp_path)
    bundle = os.path.join(root, "bundle.pem")
    with open(bundle, "wb") as f:
        f.write(_pem(generate_ca()[0]) + _pem(generate_ca()[0]))
    assert load_ca_bundle(bundle) is not None
    assert client_tls_policy(bundle) is not None
    assert client_tls_policy(None) is not None
    empty = os.path.join(root, "empty.pem")
    open(empty, "wb").close()
    with pytest.raises(TrustStoreError, match="no certificate"):
        load_ca_bundle(empty)
    with pytest.raises(TrustStoreError, match="cannot read"):
        load_ca_bundle(os.path.join(root, "missing.pem"))


def test_describe_tls_failure() -> None:
    """TLS errors, also wrapped in Twisted's multi-reason errors, give one line; others None."""
    from OpenSSL import SSL
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    err = SSL.Error([("SSL routines", "", "certificate verify failed")])
    wrapped = ResponseNeverReceived([Failure(err)])
    assert describe_tls_failure(Failure(wrapped)) == "TLS verification failed: certificate verify failed"
    assert describe_tls_failure(Failure(ConnectionRefusedError("no"))) is None
