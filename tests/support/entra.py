"""Entra ID in tests, in-process and on loopback only: a managed identity endpoint, and the HTTPS services that check
the tokens it mints (Azurite with OAuth, an Event Grid topic). Nothing here reaches a real metadata address.

`ManagedIdentityEndpoint` is the token endpoint App Service, Azure Functions and Container Apps give a process with
a managed identity: the platform sets `IDENTITY_ENDPOINT` (a loopback URL) and `IDENTITY_HEADER` (a per-process
value the caller echoes), and azure-identity's `ManagedIdentityCredential` (through MSAL's `ManagedIdentityClient`)
asks `GET <endpoint>?api-version=2019-08-01&resource=<resource>[&client_id=<user-assigned id>]` with the header
`X-IDENTITY-HEADER`; the answer is `{access_token, expires_on (epoch seconds, a string), resource, token_type}`
(https://learn.microsoft.com/azure/app-service/overview-managed-identity#rest-endpoint-reference). `env()` also sets
`AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential`, so `DefaultAzureCredential`'s chain is that one credential:
it can neither fall through to a developer login (Azure CLI, VS Code, ...) nor probe IMDS (169.254.169.254).

Tokens are JWT-shaped (header, claims, a placeholder signature): `aud` is the resource asked for, `iss` the v1
issuer `https://sts.windows.net/<tenant>/` (one of the prefixes Azurite accepts), `iat`/`nbf`/`exp` the lifetime.
Each has a unique `uti`, so two tokens are never equal. Azurite checks audience, issuer and lifetime but not the
signature (its `--oauth basic` level), and so do `EventGridTopic` and the Databricks double (`accepts`).

Token caching is azure-identity's (MSAL's): a cached token is used until it is within five minutes of its
`expires_on`, then the next call fetches a new one. `lifetimes_s` lets a test mint a token that enters that window
a few seconds after it was issued, to see the refresh happen without waiting an hour.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.databricks_double import TlsFiles
from tollwatch.adapters.databricks_jobs import AZURE_DATABRICKS_SCOPE
from tollwatch_dev.procs import ProcessRef, spawn, tail, terminate_group

HOST = "127.0.0.1"
TENANT = "00000000-0000-0000-0000-00000000e17a"
ISSUER = f"https://sts.windows.net/{TENANT}/"
#: The object id of the identity the endpoint stands for (a placeholder).
PRINCIPAL = "00000000-0000-0000-0000-0000000000a1"
#: What the platform puts in IDENTITY_HEADER for one process (a placeholder; the real one is not stored anywhere).
IDENTITY_HEADER = "placeholder-identity-header"
API_VERSION = "2019-08-01"

#: The resources azure-identity asks tokens for (the scope without `/.default`).
STORAGE = "https://storage.azure.com"
EVENT_GRID = "https://eventgrid.azure.net"
DATABRICKS = AZURE_DATABRICKS_SCOPE.removesuffix("/.default")

#: Environment variables that hold a secret for Azure, Databricks or tollwatch's storage and topic: the identity
#: path must work with none of them set.
SECRET_VARIABLES = (
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_PASSWORD",
    "MSI_SECRET",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
    "TOLLWATCH_STORAGE_CONNECTION_STRING",
    "TOLLWATCH_EVENTGRID_TOPIC_KEY",
)
#: Unset too: other ways azure-identity could authenticate (a user, a federated token file, another platform's
#: endpoint) and AZURE_CLIENT_ID (unset: the system-assigned identity).
OTHER_IDENTITY_VARIABLES = (
    "AZURE_USERNAME",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
)
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|CONNECTION_STRING|_KEY$|TOKEN$|_PAT$")
_SECRET_SCOPES = ("TOLLWATCH_", "AZURE_", "DATABRICKS_", "ARM_", "MSI_")


def secrets_in(environ: Mapping[str, str]) -> list[str]:
    """Names of the Azure / Databricks / tollwatch variables in `environ` that carry a secret (a key, a connection
    string, a client secret, a PAT, a password): what the identity path must do without."""
    return sorted(
        name
        for name, value in environ.items()
        if value and name.startswith(_SECRET_SCOPES) and (_SECRET_NAME.search(name) or name in SECRET_VARIABLES)
    )


# ---------------------------------------------------------------------------------------------------- tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: Mapping[str, Any]) -> str:
    """A JWT-shaped token: what Entra ID issues, minus a real signature (no one here checks signatures)."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "placeholder"}
    parts = (json.dumps(header).encode(), json.dumps(dict(claims), separators=(",", ":")).encode(), b"unsigned")
    return ".".join(_b64url(part) for part in parts)


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a JWT-shaped token (not verified)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None (header names in any case)."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = value.partition(" ")
    return token if scheme == "Bearer" and token else None


@dataclass(frozen=True)
class Issued:
    """One token the endpoint minted."""

    resource: str
    client_id: str | None
    token: str
    expires_on: int

    @property
    def refresh_due(self) -> float:
        """When azure-identity stops using it from its cache (five minutes before it expires)."""
        return self.expires_on - 300


# ------------------------------------------------------------------------------------------ loopback servers


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Loopback:
    """A ThreadingHTTPServer on 127.0.0.1 (HTTPS when given TLS files) whose `answer` subclasses write."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._reply("GET")

            def do_POST(self) -> None:
                self._reply("POST")

            def _reply(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = outer.answer(method, self.path, dict(self.headers.items()), body)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # the tests read the records, not a log
                pass

        self._server = _Server((HOST, 0), Handler)
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert, tls.key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__, daemon=True)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self._server.server_port}"

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class ManagedIdentityEndpoint(_Loopback):
    """The App Service / Functions / Container Apps managed identity endpoint (API version 2019-08-01), minting
    JWT-shaped tokens for whatever resource is asked; every token it issued is in `issued`."""

    PATH = "/msi/token"

    def __init__(self, *, lifetimes_s: Iterable[int] = (), default_lifetime_s: int = 3600) -> None:
        super().__init__()
        self._lifetimes = deque(lifetimes_s)
        self.default_lifetime_s = default_lifetime_s
        self.issued: list[Issued] = []
        self.refused: list[str] = []

    def env(self) -> dict[str, str]:
        """What the platform sets for a process with a managed identity, and the one-credential chain."""
        return {
            "IDENTITY_ENDPOINT": f"{self.url}{self.PATH}",
            "IDENTITY_HEADER": IDENTITY_HEADER,
            "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        }

    def mint_next(self, *lifetimes_s: int) -> None:
        """The lifetimes of the next tokens minted (then `default_lifetime_s` again)."""
        with self.lock:
            self._lifetimes.extend(lifetimes_s)

    def issued_for(self, resource: str) -> list[Issued]:
        with self.lock:
            return [token for token in self.issued if token.resource == resource]

    def accepts(self, resource: str) -> Callable[[str], bool]:
        """A check of a bearer token as the resource makes it: minted here for this resource, and not expired."""

        def valid(token: str) -> bool:
            now = time.time()
            return any(i.token == token and i.expires_on > now for i in self.issued_for(resource))

        return valid

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        given = {k.lower(): v for k, v in headers.items()}.get("x-identity-header")

        def refuse(status: int, message: str) -> tuple[int, Any]:
            with self.lock:
                self.refused.append(message)
            return status, {"statusCode": status, "message": message}

        if method != "GET" or parts.path != self.PATH:
            return refuse(404, f"no such endpoint: {method} {parts.path}")
        if given != IDENTITY_HEADER:
            return refuse(401, "X-IDENTITY-HEADER missing or wrong")
        if query.get("api-version") != API_VERSION:
            return refuse(400, f"api-version must be {API_VERSION}, got {query.get('api-version')!r}")
        resource = query.get("resource")
        if not resource:
            return refuse(400, "resource is required")
        now = int(time.time())
        with self.lock:
            lifetime = self._lifetimes.popleft() if self._lifetimes else self.default_lifetime_s
            client_id = query.get("client_id")
            claims = {
                "aud": resource,
                "iss": ISSUER,
                "iat": now,
                "nbf": now,
                "exp": now + lifetime,
                "oid": PRINCIPAL,
                "sub": PRINCIPAL,
                "tid": TENANT,
                "appid": client_id or PRINCIPAL,
                "idtyp": "app",
                "uti": uuid.uuid4().hex,
                "ver": "1.0",
            }
            issued = Issued(resource, client_id, jwt(claims), now + lifetime)
            self.issued.append(issued)
        return 200, {
            "access_token": issued.token,
            "expires_on": str(issued.expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id or PRINCIPAL,
        }


@dataclass
class Published:
    """One request to the topic."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class EventGridTopic(_Loopback):
    """An Event Grid custom topic's publish endpoint over HTTPS: `POST /api/events?api-version=2018-01-01` with a
    CloudEvents batch, authorized by an Entra ID bearer token for https://eventgrid.azure.net (the role check the
    service does, EventGrid Data Sender, is the token's `accepts`); 200 on success, 401 otherwise."""

    def __init__(self, tls: TlsFiles, accepts: Callable[[str], bool]) -> None:
        super().__init__(tls)
        self.accepts = accepts
        self.requests: list[Published] = []

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(Published(target, {k.lower(): v for k, v in headers.items()}, body))
        token = bearer(headers)
        if method != "POST" or urlsplit(target).path != "/api/events":
            return 404, {"error": {"code": "NotFound", "message": f"{method} {target}"}}
        if token is None or not self.accepts(token):
            return 401, {"error": {"code": "Unauthorized", "message": "The token is missing, expired or not ours."}}
        return 200, None


# ------------------------------------------------------------------------------------------- Azurite + OAuth

_LISTENING = re.compile(r"Azurite Blob service successfully listens on (https://\S+?:\d+)")


@dataclass
class OAuthAzurite:
    """Azurite Blob over HTTPS with `--oauth basic` (bearer tokens checked for audience, issuer and lifetime), started
    the way the local stack starts its Azurite (the project's pinned binary and flags, `tollwatch_dev.procs`), with
    the test's certificate. The Azure SDK sends bearer tokens over HTTPS only, hence the certificate."""

    state_dir: Path
    tls: TlsFiles
    startup_timeout_s: float = 30.0
    url: str = field(default="", init=False)
    _process: ProcessRef | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / "azurite-oauth.log"

    @property
    def account_url(self) -> str:
        """TOLLWATCH_STORAGE_ACCOUNT_URL for the emulator's account (path-style, as Azurite serves it)."""
        return f"{self.url}/devstoreaccount1"

    def __enter__(self) -> OAuthAzurite:
        from tollwatch_dev.stack import PROJECT_ROOT, _Azurite

        azurite = _Azurite("azurite-oauth", self.state_dir)
        azurite.preflight()
        tls = ["--cert", str(self.tls.cert), "--key", str(self.tls.key), "--oauth", "basic"]
        self._process = spawn(azurite.argv(0) + tls, log_path=self.log_path, env=os.environ, cwd=PROJECT_ROOT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self
            if not self._process.alive():
                break
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"Azurite with OAuth did not start:\n{tail(self.log_path)}")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            terminate_group(self._process, timeout=10)
            self._process = None
