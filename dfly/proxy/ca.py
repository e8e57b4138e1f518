"""The proxy's certificate authority: one CA per daemon home, leaf certificates minted per host.

The CA (EC P-256, ten years, C{basicConstraints CA:TRUE} critical, C{keyCertSign}/C{cRLSign})
lives as C{ca.pem} and C{ca.key} (mode 0600) in a directory: C{dfly-ca init --home DIR}
creates it, and the peer daemon creates it on first use when it is missing.  Clients that
should accept intercepted ("hijacked") HTTPS trust C{ca.pem}.

Leaf certificates are minted when a client first asks for a host: subjectAltName is the
host's DNS name or IP address (Go's TLS stack ignores the common name), C{serverAuth}
extended key usage, a random serial, valid from a day ago for about a year.  All leaves
share one key pair (generated once per process), and the minted server contexts are kept
in a small LRU cache, so a host costs one signature per process lifetime while it stays
in the cache.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dfly.errors import DflyError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_YEARS = 10
LEAF_DAYS = 365
LEAF_CACHE = 256


class CertificateAuthorityError(DflyError):
    """The CA files are missing, unreadable, or not a CA certificate with its key."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dfly"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def generate_ca(common_name: str = "dfly proxy CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA certificate and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def host_san(host: str) -> x509.GeneralName:
    """The subjectAltName entry for C{host}: an IP address entry for literals, else DNS."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        return x509.DNSName(bare.lower().rstrip("."))


def mint_leaf(
    host: str, ca_cert: x509.Certificate, ca_key: Any, leaf_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """A server certificate for C{host} signed by the CA, carrying C{leaf_key}'s public key."""
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([host_san(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def ca_paths(directory: str) -> tuple[str, str]:
    """Where the CA certificate and key of C{directory} live."""
    return os.path.join(directory, CA_CERT), os.path.join(directory, CA_KEY)


def write_ca(directory: str, force: bool = False) -> str:
    """Generate a CA into C{directory}; returns the certificate's path.

    Refuses (L{CertificateAuthorityError}) to replace an existing one unless C{force}.
    The key is written with mode 0600 before any byte of it is.
    """
    cert_path, key_path = ca_paths(directory)
    if not force and (os.path.exists(cert_path) or os.path.exists(key_path)):
        raise CertificateAuthorityError(f"a CA already exists in {directory} (use --force to replace it)")
    os.makedirs(directory, exist_ok=True)
    cert, key = generate_ca()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp_key = key_path + ".tmp"
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key_pem)
    tmp_cert = cert_path + ".tmp"
    with open(tmp_cert, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)
    return cert_path


def load_ca(directory: str) -> tuple[x509.Certificate, Any]:
    """Read the CA of C{directory}; L{CertificateAuthorityError} if it is missing or broken."""
    cert_path, key_path = ca_paths(directory)
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertificateAuthorityError(f"cannot load the CA in {directory}: {e}") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as e:
        raise CertificateAuthorityError(f"{cert_path} is not a CA certificate: {e}") from None
    if not constraints.ca:
        raise CertificateAuthorityError(f"{cert_path} is not a CA certificate (CA:FALSE)")
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateAuthorityError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def ensure_ca(directory: str) -> tuple[str, bool]:
    """The CA certificate path of C{directory}, creating the CA if it is missing.

    Returns C{(path, created)}.
    """
    cert_path, key_path = ca_paths(directory)
    if os.path.exists(cert_path) or os.path.exists(key_path):
        load_ca(directory)
        return cert_path, False
    return write_ca(directory), True


@dataclass
class Leaf:
    """A minted certificate for one host, with its key and the chain up to the CA."""

    host: str
    certificate: x509.Certificate
    key: Any
    chain: list[x509.Certificate]


class CertificateAuthority:
    """Mints leaves for hosts from a loaded CA and keeps the newest C{cache_size} of them."""

    def __init__(self, cert: x509.Certificate, key: Any, cache_size: int = LEAF_CACHE) -> None:
        self.cert = cert
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self.minted = 0

    @classmethod
    def from_directory(cls, directory: str, cache_size: int = LEAF_CACHE) -> CertificateAuthority:
        cert, key = load_ca(directory)
        return cls(cert, key, cache_size)

    def leaf(self, host: str) -> Leaf:
        """A freshly minted leaf for C{host} (not cached; see L{server_options})."""
        cert = mint_leaf(host, self.cert, self._key, self._leaf_key)
        self.minted += 1
        return Leaf(host, cert, self._leaf_key, [self.cert])

    def server_options(self, host: str) -> Any:
        """TLS server options presenting a leaf for C{host}, from the LRU cache or minted now."""
        host = host.lower()
        options = self._cache.get(host)
        if options is not None:
            self._cache.move_to_end(host)
            return options
        from twisted.internet.ssl import CertificateOptions

        leaf = self.leaf(host)
        # pyOpenSSL contexts take cryptography objects directly (its own types are deprecated).
        key: Any = leaf.key
        certificate: Any = leaf.certificate
        chain: Any = leaf.chain
        options = CertificateOptions(
            privateKey=key,
            certificate=certificate,
            extraCertChain=chain,
            acceptableProtocols=[b"http/1.1"],
        )
        self._cache[host] = options
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return options

    def cached_hosts(self) -> list[str]:
        """Hosts with a cached leaf, least recently used first."""
        return list(self._cache)


def main(argv: list[str] | None = None) -> int:
    """C{dfly-ca init --home DIR [--force]}: create the proxy CA and say how to trust it."""
    from dfly.config import data_home

    parser = argparse.ArgumentParser(
        prog="dfly-ca", description="Manage the certificate authority the peer daemon's HTTPS proxy signs with."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the CA (ca.pem, ca.key) in the peer's home")
    init.add_argument("--home", default=data_home("peer"), help="the peer daemon's home (default: %(default)s)")
    init.add_argument("--ca-dir", help="directory for the CA (default: the home)")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    show = sub.add_parser("path", help="print the CA certificate's path")
    show.add_argument("--home", default=data_home("peer"))
    show.add_argument("--ca-dir")
    args = parser.parse_args(argv)
    directory = os.path.abspath(args.ca_dir or args.home)
    try:
        if args.command == "path":
            cert_path, _ = ca_paths(directory)
            load_ca(directory)
            print(cert_path)
            return 0
        cert_path = write_ca(directory, force=args.force)
    except (CertificateAuthorityError, OSError) as e:
        print(f"dfly-ca: {e}", file=sys.stderr)
        return 1
    print(cert_path)
    print(
        "Clients that go through the peer's proxy with hijacked hosts must trust this certificate:\n"
        f"  curl --cacert {cert_path} ...\n"
        f"  Debian/Ubuntu: cp {cert_path} /usr/local/share/ca-certificates/dfly-proxy.crt && update-ca-certificates\n"
        f"  containerd/docker: cp {cert_path} /etc/containerd/certs.d/HOST/ca.crt (or /etc/docker/certs.d/HOST/ca.crt)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
