"""A Docker/distribution token server (https://distribution.github.io/distribution/spec/auth/token/).

Tokens are RS256 JWTs. distribution 2.8 finds the verification key through the JWT header ``kid``, which
must be the libtrust key ID of a public key found in ``auth.token.rootcertbundle``; see :func:`libtrust_key_id`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._util import ThreadedUvicorn

ISSUER = "testbed-token-issuer"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-secret"
PRIVATE_USER = "ghcr-user"
PRIVATE_PASSWORD = "ghcr-pass"
PRIVATE_PREFIX = "private/"
#: a valid account without access to private repositories
OTHER_USER = "other-user"
OTHER_PASSWORD = "other-pass"
#: two robot accounts, each allowed to pull its own namespace only, which no one else (but admin) may pull
TEAM_A_USER = "team-a-robot"
TEAM_A_PASSWORD = "team-a-pass"
TEAM_B_USER = "team-b-robot"
TEAM_B_PASSWORD = "team-b-pass"
NAMESPACES = {TEAM_A_USER: "team-a/", TEAM_B_USER: "team-b/"}
#: the OAuth2 error (RFC 6749 5.2) of an unknown refresh token
UNKNOWN_REFRESH_TOKEN = "unknown refresh token"


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """libtrust's key ID: base32(sha256(DER SubjectPublicKeyInfo)[:30]) in ':'-joined groups of 4 characters."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """Parse ``type:name:actions``; the name may itself contain ':' (e.g. a host:port prefix)."""
        head, sep, actions = text.rpartition(":")
        if not sep:
            return None
        rtype, sep, name = head.partition(":")
        if not sep or not rtype or not name:
            return None
        return cls(rtype, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """One request that reached the token server (successful or not)."""

    path: str
    method: str
    service: str | None
    scopes: tuple[str, ...]
    #: the authenticated Basic-auth user if any, else the ``account`` query parameter, else None
    account: str | None
    #: the Basic-auth user name that was presented (valid or not), None when anonymous
    basic_user: str | None
    status: int
    #: what the issued token grants, as ``type:name:actions`` strings (actions may be empty)
    granted: tuple[str, ...]
    time: float = field(default_factory=time.time)
    #: the OAuth2 ``grant_type`` of a POST ("password", "refresh_token"), None for GET
    grant_type: str | None = None


@dataclass(frozen=True)
class TokenEndpoint:
    """A service name registered at a token path (a registry's ``realm`` is server URL + path)."""

    path: str
    service: str


class TokenServer:
    """An in-process token server with request statistics. Start it with :meth:`start`."""

    def __init__(
        self,
        *,
        ttl: int = 300,
        users: Mapping[str, str] | None = None,
        issuer: str = ISSUER,
        header_mode: str = "kid",
    ) -> None:
        #: seconds a token is valid; may be changed while running
        self.ttl = ttl
        self.issuer = issuer
        #: "kid" (libtrust key id, the default), "x5c" (certificate chain) or "both"
        self.header_mode = header_mode
        self.users: dict[str, str] = dict(
            users
            if users is not None
            else {
                ADMIN_USER: ADMIN_PASSWORD,
                PRIVATE_USER: PRIVATE_PASSWORD,
                OTHER_USER: OTHER_PASSWORD,
                TEAM_A_USER: TEAM_A_PASSWORD,
                TEAM_B_USER: TEAM_B_PASSWORD,
            }
        )
        #: user -> the one repository prefix it may pull, and only it may (may be changed while running)
        self.namespaces: dict[str, str] = dict(NAMESPACES)
        #: refresh tokens issued (POST with ``access_type=offline``) -> their user
        self.refresh_tokens: dict[str, str] = {}
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self._key.public_key())
        self.certificate = self._self_signed_certificate()
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._private_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._endpoints: dict[str, dict[str, TokenEndpoint]] = {}
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadedUvicorn | None = None

    # ----------------------------------------------------------------- setup
    def _self_signed_certificate(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testbed token signer")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    def write_certificate(self, path: Path) -> Path:
        """Write the PEM root certificate bundle for distribution's ``auth.token.rootcertbundle``."""
        path.write_bytes(self.certificate_pem)
        return path

    def add_endpoint(self, path: str, service: str) -> TokenEndpoint:
        """Serve tokens for ``service`` at ``path``. Register before :meth:`start`."""
        endpoint = TokenEndpoint(path=path, service=service)
        self._endpoints.setdefault(path, {})[service] = endpoint
        return endpoint

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("token server not started")
        return self._server.url

    def realm(self, path: str) -> str:
        return self.url + path

    def start(self) -> None:
        routes = [Route(path, self._handle, methods=["GET", "POST"]) for path in self._endpoints]
        self._server = ThreadedUvicorn(Starlette(routes=routes), name="token-server")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    # ----------------------------------------------------------------- stats
    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of the requests received since start or the last :meth:`reset`."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, *, service: str | None = None, path: str | None = None, account: str | None = None) -> int:
        """How many recorded requests match all the given filters."""
        return sum(
            1
            for r in self.requests
            if (service is None or r.service == service)
            and (path is None or r.path == path)
            and (account is None or r.account == account)
        )

    # ----------------------------------------------------------------- policy
    def grant(self, user: str | None, scope: Scope) -> tuple[str, ...]:
        """Actions ``user`` (None = anonymous) gets for ``scope``."""
        requested = scope.actions
        if user == ADMIN_USER:
            return tuple(a for a in requested if a in ("pull", "push", "delete", "*"))
        if scope.type != "repository" and not scope.type.startswith("repository("):
            return ()
        owner = next((u for u, prefix in self.namespaces.items() if scope.name.startswith(prefix)), None)
        if owner is not None or user in self.namespaces:
            return tuple(a for a in requested if a == "pull") if owner == user else ()
        if scope.name.startswith(PRIVATE_PREFIX) and user != PRIVATE_USER:
            return ()
        return tuple(a for a in requested if a == "pull")

    # ----------------------------------------------------------------- minting
    def mint(
        self,
        service: str,
        subject: str,
        access: Iterable[Scope],
        *,
        ttl: int | None = None,
        header_mode: str | None = None,
        key_id: str | None = None,
        issuer: str | None = None,
    ) -> tuple[str, int]:
        """Sign a token (no policy check, not recorded). Returns (token, expires_in).

        ``header_mode`` ("kid", "x5c", "both", "none"), ``key_id`` and ``issuer`` override the server's settings
        for this token only (to provoke verification failures in tests).
        """
        expires_in = self.ttl if ttl is None else ttl
        mode = self.header_mode if header_mode is None else header_mode
        now = int(time.time())
        claims = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": subject,
            "aud": service,
            "exp": now + expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [{"type": s.type, "name": s.name, "actions": list(s.actions)} for s in access],
        }
        headers: dict[str, object] = {"typ": "JWT"}
        if mode in ("kid", "both"):
            headers["kid"] = self.key_id if key_id is None else key_id
        if mode in ("x5c", "both"):
            der = self.certificate.public_bytes(serialization.Encoding.DER)
            headers["x5c"] = [base64.b64encode(der).decode("ascii")]
        token = jwt.encode(claims, self._private_pem, algorithm="RS256", headers=headers)
        return token, expires_in

    def decode(self, token: str, service: str | None = None) -> dict[str, Any]:
        """Verify and decode a token issued by this server (for tests)."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self._key.public_key(),
            algorithms=["RS256"],
            audience=service,
            options={"verify_aud": service is not None},
            issuer=self.issuer,
        )
        return claims

    # ----------------------------------------------------------------- HTTP
    @staticmethod
    def _basic_credentials(request: Request) -> tuple[str, str] | str | None:
        """(user, password), None when absent, or an error string when malformed."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return "unsupported authorization scheme"
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "malformed basic credentials"
        if not sep:
            return "malformed basic credentials"
        return user, password

    def _authenticate(
        self, request: Request, first: Callable[[str], str | None]
    ) -> tuple[str | None, str | None, tuple[int, str] | None]:
        """(authenticated user, presented user name, error) for a token request."""
        creds = self._basic_credentials(request)
        if request.method == "POST":
            # OAuth2 password grant (containerd tries this first when it has credentials), or a refresh
            # token this server issued (RFC 6749 6; distribution's oauth.md)
            grant_type = first("grant_type") or ""
            if grant_type == "refresh_token":
                with self._lock:
                    owner = self.refresh_tokens.get(first("refresh_token") or "")
                if owner is None or owner not in self.users:
                    return None, None, (400, UNKNOWN_REFRESH_TOKEN)
                return owner, owner, None
            if grant_type != "password":
                return None, None, (400, f"unsupported grant_type {grant_type!r}")
            creds = (first("username") or "", first("password") or "")
        if isinstance(creds, str):
            return None, None, (401, creds)
        if creds is None:
            return None, None, None
        if self.users.get(creds[0]) != creds[1]:
            return None, creds[0], (401, "incorrect username or password")
        return creds[0], creds[0], None

    def _grant_all(self, user: str | None, scope_texts: Sequence[str]) -> tuple[list[Scope], tuple[int, str] | None]:
        granted: list[Scope] = []
        for text in scope_texts:
            parsed = Scope.parse(text)
            if parsed is None:
                return [], (400, f"invalid scope {text!r}")
            granted.append(Scope(parsed.type, parsed.name, self.grant(user, parsed)))
        return granted, None

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        params: list[tuple[str, str]] = list(request.query_params.multi_items())
        if request.method == "POST":
            body = (await request.body()).decode("utf-8", "replace")
            params += urllib.parse.parse_qsl(body, keep_blank_values=True)
        multi: dict[str, list[str]] = {}
        for key, value in params:
            multi.setdefault(key, []).append(value)

        def first(key: str) -> str | None:
            values = multi.get(key)
            return values[0] if values else None

        service = first("service")
        scope_texts = tuple(s for raw in multi.get("scope", []) for s in raw.split(" ") if s)
        account_param = first("account")

        user, basic_user, error = self._authenticate(request, first)
        endpoint = self._endpoints.get(path, {}).get(service or "")
        if error is None and endpoint is None:
            error = (400, f"unknown service {service!r} for token endpoint {path}")
        granted: list[Scope] = []
        if error is None:
            granted, error = self._grant_all(user, scope_texts)

        status = error[0] if error else 200
        self._record(
            TokenRequest(
                path=path,
                method=request.method,
                service=service,
                scopes=scope_texts,
                account=user if user is not None else account_param,
                basic_user=basic_user,
                status=status,
                granted=tuple(str(s) for s in granted),
                grant_type=first("grant_type") if request.method == "POST" else None,
            )
        )
        if error is not None:
            headers = {"WWW-Authenticate": 'Basic realm="testbed"'} if status == 401 else {}
            code = "UNAUTHORIZED" if status == 401 else "INVALID_REQUEST"
            doc: dict[str, object] = {
                "errors": [{"code": code, "message": error[1], "detail": None}],
                "details": error[1],
            }
            if error[1] == UNKNOWN_REFRESH_TOKEN:
                doc["error"] = "invalid_grant"  # RFC 6749 5.2
            return JSONResponse(doc, status_code=status, headers=headers)
        assert service is not None
        token, expires_in = self.mint(service, user or "", granted)
        issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body_out: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": issued_at,
        }
        if request.method == "POST" and first("access_type") == "offline" and user is not None:
            # oauth.md: a refresh token "will only be set when access_type=offline is provided"
            refresh_token = secrets.token_urlsafe(24)
            with self._lock:
                self.refresh_tokens[refresh_token] = user
            body_out["refresh_token"] = refresh_token
        return Response(json.dumps(body_out), media_type="application/json")

    def _record(self, record: TokenRequest) -> None:
        with self._lock:
            self._requests.append(record)


def parse_scopes(scopes: str | Sequence[str]) -> list[Scope]:
    texts = [scopes] if isinstance(scopes, str) else list(scopes)
    result: list[Scope] = []
    for text in texts:
        for part in text.split(" "):
            if not part:
                continue
            parsed = Scope.parse(part)
            if parsed is None:
                raise ValueError(f"invalid scope {part!r}")
            result.append(parsed)
    return result
