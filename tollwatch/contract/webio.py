"""Transport-neutral HTTP request and reply, so the core can answer webhooks without importing a web framework.

The Azure Functions handlers (and the local dev host, through them) convert `azure.functions.HttpRequest`
into an `InboundRequest` and a `Reply` back into an `HttpResponse`; everything in between is plain, typed
core code that tests can call directly. Replies are always JSON and never carry a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field


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
        return cls(status=status, body={"error": reason}, headers=dict(headers or {}))

    def body_bytes(self) -> bytes:
        """The serialised body (empty when there is none)."""
        return b"" if self.body is None else orjson.dumps(self.body)
