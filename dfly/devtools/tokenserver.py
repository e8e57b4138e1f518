"""A small Docker registry token server for tests (the C{auth.token} realm of a real registry).

The registry answers an anonymous request with C{401} and C{WWW-Authenticate: Bearer
realm=...,service=...,scope=...}; the client asks this server for a token, with or without Basic
credentials, and retries with C{Authorization: Bearer <token>}.  Tokens are JWTs signed RS256 with
the key of a certificate the registry lists in C{auth.token.rootcertbundle}; the certificate
itself travels in the JWT header as C{x5c}, which is how distribution 2.8 finds the key.

Policy: a known user with the right password gets the actions it asked for that its entry allows
(C{--users} JSON: C{{"name": {"password": "...", "actions": ["pull", "push"]}}}); a wrong password
gets C{401}; an anonymous client gets a token with no access, so the registry refuses it.
C{GET /token} (Basic credentials) and C{POST /token} (OAuth2 password grant, as containerd
sends) both work.  C{GET /_stats} counts tokens issued per subject and refusals.

    python -m dfly.devtools.tokenserver --key K --cert C --users U.json --issuer I --ready-file F
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import sys
import time
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

TOKEN_TTL = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(claims: dict[str, Any], key: rsa.RSAPrivateKey, cert: x509.Certificate) -> str:
    """A compact JWS (RS256) of C{claims} with C{cert} as its one-element C{x5c} chain."""
    header = {
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
    }
    signing_input = b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + b64url(
        json.dumps(claims, separators=(",", ":")).encode()
    )
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


def parse_scopes(scopes: list[str]) -> list[tuple[str, str, list[str]]]:
    """C{repository:name:pull,push} (names may contain colons only before the last one)."""
    out = []
    for scope in scopes:
        for item in scope.split():
            kind, sep, rest = item.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if sep and sep2 and kind and name:
                out.append((kind, name, [a for a in actions.split(",") if a]))
    return out


class TokenResource(Resource):
    isLeaf = True

    def __init__(self, key: rsa.RSAPrivateKey, cert: x509.Certificate, users: dict[str, Any], issuer: str) -> None:
        super().__init__()
        self.key = key
        self.cert = cert
        self.users = users
        self.issuer = issuer
        self.stats: dict[str, Any] = {"issued": {}, "refused": 0}

    def render_GET(self, request: Request) -> bytes:
        if request.path == b"/_stats":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.stats).encode()
        if request.path != b"/token":
            request.setResponseCode(404)
            return b"not found\n"
        args = {k.decode(): [v.decode() for v in vs] for k, vs in (request.args or {}).items()}
        user = self._basic(request)
        return self._issue(request, user, args.get("service", [""])[0], args.get("scope", []))

    def render_POST(self, request: Request) -> bytes:
        if request.path != b"/token":
            request.setResponseCode(404)
            return b"not found\n"
        assert request.content is not None
        form = parse_qs(request.content.read(65536).decode("utf-8", "replace"))
        user: tuple[str, str] | None = None
        if form.get("grant_type", [""])[0] == "password":
            user = (form.get("username", [""])[0], form.get("password", [""])[0])
        return self._issue(request, user, form.get("service", [""])[0], form.get("scope", []))

    @staticmethod
    def _basic(request: Request) -> tuple[str, str] | None:
        header = request.getHeader(b"authorization")
        if not header or not header.lower().startswith(b"basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return ("", "")
        return (name, password)

    def _issue(self, request: Request, user: tuple[str, str] | None, service: str, scopes: list[str]) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        subject = ""
        allowed: list[str] = []
        if user is not None:
            entry = self.users.get(user[0])
            if not isinstance(entry, dict) or not secrets.compare_digest(str(entry.get("password", "")), user[1]):
                self.stats["refused"] += 1
                request.setResponseCode(401)
                request.setHeader(b"www-authenticate", b'Basic realm="dfly token server"')
                return json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).encode()
            subject = user[0]
            allowed = list(entry.get("actions", []))
        access = [
            {"type": kind, "name": name, "actions": [a for a in actions if a in allowed]}
            for kind, name, actions in parse_scopes(scopes)
            if kind == "repository"
        ]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service,
            "exp": now + TOKEN_TTL,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = sign_jwt(claims, self.key, self.cert)
        key = subject or "(anonymous)"
        self.stats["issued"][key] = self.stats["issued"].get(key, 0) + 1
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return json.dumps({"token": token, "access_token": token, "expires_in": TOKEN_TTL, "issued_at": issued_at}).encode()


class Options(usage.Options):
    optParameters = [
        ["key", None, None, "PEM private key (RSA) that signs tokens."],
        ["cert", None, None, "PEM certificate of that key (the registry's rootcertbundle)."],
        ["users", None, None, 'JSON file: {"name": {"password": "...", "actions": ["pull"]}}.'],
        ["issuer", None, "dfly-token", "The iss claim (the registry's auth.token.issuer)."],
        ["port", None, "tcp:0:interface=127.0.0.1", "Endpoint to listen on."],
        ["ready-file", None, None, 'Write {"port": N} here once listening.'],
    ]

    def postOptions(self) -> None:
        for name in ("key", "cert", "users"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    opts = Options()
    opts.parseOptions(sys.argv[1:] if argv is None else argv)
    with open(opts["key"], "rb") as kf:
        key = serialization.load_pem_private_key(kf.read(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SystemExit("tokenserver: --key must be an RSA key")
    with open(opts["cert"], "rb") as cf:
        cert = x509.load_pem_x509_certificate(cf.read())
    with open(opts["users"]) as uf:
        users = json.load(uf)

    def listening(port: Any) -> None:
        number = port.getHost().port
        if opts["ready-file"]:
            tmp = opts["ready-file"] + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"port": number}, f)
            os.replace(tmp, opts["ready-file"])
        print(f"token server on port {number}", flush=True)

    def failed(f: Any) -> None:
        print(f"tokenserver: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    site = Site(TokenResource(key, cert, users, opts["issuer"]))
    d = serverFromString(reactor, opts["port"]).listen(site)
    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
