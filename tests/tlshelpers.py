"""Test PKI for loopback HTTPS tests: a private CA and server certificates from it, as files.

These stand for a registry's own private CA (not dfly's proxy CA, which the daemon makes).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dfly.proxy.ca import generate_ca, mint_leaf


@dataclass
class Pki:
    """A test CA's certificate file, and the directory of the server certificates it signed."""

    ca_pem: str
    directory: str

    def server(self, name: str) -> tuple[str, str]:
        """(key path, cert path) of a server certificate for C{name} signed by this CA."""
        return os.path.join(self.directory, f"{name}.key"), os.path.join(self.directory, f"{name}.pem")


def make_pki(directory: str, names: list[str]) -> Pki:
    """A test CA in C{directory}/testca.pem and a certificate plus key for each of C{names}."""
    os.makedirs(directory, exist_ok=True)
    ca_cert, ca_key = generate_ca("dfly test origin CA")
    ca_pem = os.path.join(directory, "testca.pem")
    with open(ca_pem, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki = Pki(ca_pem, directory)
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = mint_leaf(name, ca_cert, ca_key, key)
        key_path, cert_path = pki.server(name)
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    return pki


def tls_endpoint(pki: Pki, name: str) -> str:
    """A listening endpoint string for a TLS server presenting C{name}'s certificate."""
    key, cert = pki.server(name)
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


class ByteServer:
    """A loopback TCP server in a thread; C{handler(conn)} runs for each connection.

    Used as the far end of a tunnel (which carries any bytes, not only TLS).
    """

    def __init__(self, handler: object) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                self.handler(conn)  # type: ignore[operator]
            except OSError as e:
                self.errors.append(e)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(30)
