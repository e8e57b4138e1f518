"""TLS client policy for every HTTPS connection dfly makes to an origin or registry.

Certificates are always verified, with service_identity checking that the certificate
names the host that was asked for: against the system trust store by default, or against
a PEM bundle (a private CA) when one is configured.  There is no switch to turn
verification off.  A failed verification surfaces as a connection failure whose text says
why (L{describe_tls_failure}), which the callers turn into an C{OriginError} or a 502.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

from dfly.errors import DflyError


class TrustStoreError(DflyError):
    """A configured CA bundle cannot be read or holds no certificate."""


def load_ca_bundle(path: str) -> IOpenSSLTrustRoot:
    """A trust root made of every certificate in the PEM file at C{path}."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            pem = f.read()
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise TrustStoreError(f"no certificate in CA bundle {path}")
        certs = x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as e:
        raise TrustStoreError(f"cannot read CA bundle {path}: {e}") from None
    if not certs:
        raise TrustStoreError(f"no certificate in CA bundle {path}")
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(_pem_encoding())) for c in certs]
    )


def _pem_encoding() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM


def client_tls_policy(ca_file: str | None) -> IPolicyForHTTPS:
    """The policy for an C{Agent}: verify against the system store, or the bundle C{ca_file}."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(trustRoot=load_ca_bundle(ca_file))


def describe_tls_failure(failure: Failure | BaseException) -> str | None:
    """One line saying why a TLS handshake failed, or None when C{failure} is not a TLS error.

    Twisted reports verification failures as C{OpenSSL.SSL.Error} (possibly wrapped in
    C{ResponseNeverReceived}/C{ConnectingCancelledError}); service_identity's mismatch
    is among the error reasons.
    """
    from OpenSSL import SSL

    value = failure.value if isinstance(failure, Failure) else failure
    stack: list[Any] = [value]
    seen = 0
    while stack and seen < 20:
        seen += 1
        exc = stack.pop()
        if isinstance(exc, Failure):
            exc = exc.value
        if isinstance(exc, SSL.Error):
            return "TLS verification failed: " + _ssl_error_text(exc)
        if type(exc).__name__ == "VerificationError":
            return f"TLS verification failed: {exc}"
        for attr in ("reasons", "failures"):
            inner = getattr(exc, attr, None)
            if isinstance(inner, list):
                stack.extend(inner)
    return None


def _ssl_error_text(exc: Exception) -> str:
    parts = []
    for arg in exc.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and len(item) == 3:
                    parts.append(str(item[2]))
                else:
                    parts.append(str(item))
        else:
            parts.append(str(arg))
    return "; ".join(p for p in parts if p) or type(exc).__name__
