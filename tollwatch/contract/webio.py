"""Transport-neutral HTTP request and reply, so the core can answer webhooks without importing a web framework.

The Azure Functions handlers (and the local dev host, through them) convert `azure.functions.HttpRequest`
into an `InboundRequest` and a `Reply` back into an `HttpResponse`; everything in between is plain, typed
core code that tests can call directly. Replies are always JSON and never carry a traceback.

The Functions host's own front door (route prefix, function key, body limit) is stated here too, because the
OpenAPI document (`functions/openapi.py`) and the local dev host (`tollwatch_dev/funchost.py`) both describe it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

#: Where the Functions host mounts HTTP routes (host.json `extensions.http.routePrefix`).
ROUTE_PREFIX = "api"
#: How a caller presents the function key: this header, or the query parameter below (host behaviour).
FUNCTION_KEY_HEADER = "x-functions-key"
FUNCTION_KEY_QUERY = "code"
#: The Functions host refuses request bodies above 100 MB (413) before any function runs.
HOST_MAX_BODY_BYTES = 100 * 1024 * 1024


class InboundRequest(BaseModel):
    """What a handler needs from an HTTP request. Header names are lower-cased on the way in."""

    model_config = ConfigDict(frozen=True)

    method: str
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def build(
        cls,
        method: str,
        *,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> InboundRequest:
        """Normalise method and header case once, so lookups never depend on how a client spelled them."""
        return cls(
            method=method.upper(),
            headers={k.lower(): v for k, v in (headers or {}).items()},
            query=dict(query or {}),
            body=body,
        )

    def header(self, name: str) -> str | None:
        """A header value by case-insensitive name."""
        return self.headers.get(name.lower())


class ErrorBody(BaseModel):
    """The body of every refusal and failure a handler answers with: one sentence, never a traceback."""

    error: str = Field(description="what went wrong and, where the caller can act, what to do")


class Reply(BaseModel):
    """What to answer: a status, a JSON body (or none) and extra headers."""

    model_config = ConfigDict(frozen=True)

    status: int
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def with_json(cls, status: int, body: Any, headers: Mapping[str, str] | None = None) -> Reply:
        """A reply whose body is serialised as JSON."""
        return cls(status=status, body=body, headers=dict(headers or {}))

    @classmethod
    def error(cls, status: int, reason: str, headers: Mapping[str, str] | None = None) -> Reply:
        """`{"error": reason}`: one sentence a human (or Event Grid's dead-letter log) can act on."""
        return cls(status=status, body=ErrorBody(error=reason).model_dump(), headers=dict(headers or {}))

    def body_bytes(self) -> bytes:
        """The serialised body (empty when there is none)."""
        return b"" if self.body is None else orjson.dumps(self.body)
