"""The one place that turns settings into I/O clients.

Everything else receives clients as arguments, so tests and the local stack swap endpoints by settings,
never by patching, and production auth (DefaultAzureCredential, app tokens, API keys) lives here only.

`Resources` is what a process (a flow run, a CLI command) holds: every client built once, on first use, from
one `Settings`, sharing one credential, and closed together. The functions below build one client each, for
callers whose lifetime is a single invocation (the Function handlers) and for `Resources` itself.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from azure.storage.blob import BlobServiceClient
from pydantic import SecretStr

from tollwatch.adapters.blob_state import JsonBlobStore
from tollwatch.adapters.net import tls_context
from tollwatch.adapters.prefect_events import EventSink, PrefectEventsEmitter, WebhookEmitter
from tollwatch.adapters.socrata import SocrataClient, build_http_client
from tollwatch.contract.errors import ConfigurationError
from tollwatch.contract.quality import QualitySpec, load_spec
from tollwatch.contract.settings import Settings
from tollwatch.core.backfill import PLANNING_ATTEMPTS
from tollwatch.core.landing import LandingZone
from tollwatch.core.receiver import EventGridReceiver, ReceiverPolicy, SequencerStore
from tollwatch.core.watermark import UpstreamWatcher, WatermarkStore

if TYPE_CHECKING:
    from tollwatch.adapters.eventgrid_out import CompletionPublisher
    from tollwatch.core.branches import Branches
    from tollwatch.core.table import IcebergTableStore


def azure_credential(managed_identity_client_id: str | None = None) -> Any:
    """Entra ID for every Azure client of a process: a managed/workload identity in Azure, the developer's login
    elsewhere. One per `Resources`, so its tokens are fetched once and refreshed, not once per client.

    `managed_identity_client_id` picks one of several user-assigned identities; unset, azure-identity takes
    `AZURE_CLIENT_ID` from the environment, else the system-assigned identity (passing None explicitly would
    override `AZURE_CLIENT_ID`, so it is only passed when given).
    """
    from azure.identity import DefaultAzureCredential  # imported lazily: slow, and only for Azure

    if managed_identity_client_id:
        return DefaultAzureCredential(managed_identity_client_id=managed_identity_client_id)
    return DefaultAzureCredential()


def blob_service(settings: Settings, credential: Any = None) -> BlobServiceClient:
    """Azurite/key auth by connection string, or Entra ID (`credential`, else a new DefaultAzureCredential) by
    account URL."""
    retries = {"retry_total": settings.storage_retry_total}
    if settings.storage_connection_string:
        return BlobServiceClient.from_connection_string(
            settings.storage_connection_string.get_secret_value(), **retries
        )
    if settings.storage_account_url:
        return BlobServiceClient(
            str(settings.storage_account_url), credential=credential or azure_credential(), **retries
        )
    raise ConfigurationError(
        "no blob storage configured: set TOLLWATCH_STORAGE_CONNECTION_STRING (Azurite, or key auth) "
        "or TOLLWATCH_STORAGE_ACCOUNT_URL (Entra ID); `tollwatch stack up` prints the local values"
    )


def landing_zone(settings: Settings, service: BlobServiceClient | None = None) -> LandingZone:
    return LandingZone((service or blob_service(settings)).get_container_client(settings.storage_container))


def socrata_client(settings: Settings, http: httpx.Client | None = None) -> SocrataClient:
    """The upstream client; pass `http` to own (and close) its connection pool yourself."""
    token = settings.upstream_app_token.get_secret_value() if settings.upstream_app_token else None
    return SocrataClient(
        http or build_http_client(settings.upstream_url, settings.upstream_timeout_s),
        app_token=token,
        max_attempts=settings.upstream_max_attempts,
        backoff_max_s=settings.upstream_backoff_max_s,
    )


@contextmanager
def planning_socrata(settings: Settings) -> Iterator[SocrataClient]:
    """A Socrata client for a planner someone waits on (a CLI user, an HTTP caller): each query is tried at most
    `PLANNING_ATTEMPTS` times, and its connections close when planning ends."""
    quick = settings.model_copy(
        update={"upstream_max_attempts": min(settings.upstream_max_attempts, PLANNING_ATTEMPTS)}
    )
    with build_http_client(quick.upstream_url, quick.upstream_timeout_s) as http:
        yield socrata_client(quick, http)


def table_store(settings: Settings, identifier: str | None = None):  # -> IcebergTableStore (pyiceberg: lazy, heavy)
    """The bronze table, or `identifier` (a downstream job's output) in the same catalog."""
    from tollwatch.core.table import IcebergTableStore

    if not settings.catalog_properties:
        settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
        share_sqlite_catalog(settings.warehouse_dir / "catalog.db")
    return IcebergTableStore.from_properties(
        settings.catalog_name, settings.resolved_catalog_properties(), identifier or settings.table
    )


def share_sqlite_catalog(database: Path) -> None:
    """Put the local catalog database in WAL mode (persistent, idempotent) so the two engines can share it.

    Iceberg's JDBC catalog in a Spark driver keeps a read open on the database between statements; in SQLite's
    default rollback-journal mode that shared lock makes every pyiceberg commit fail with "database is locked"
    while the driver lives. In WAL mode readers never block a writer.
    """
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
        if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            connection.execute("PRAGMA journal_mode=WAL")


def prefect_api_url(settings: Settings) -> str:
    url = str(settings.prefect_api_url) if settings.prefect_api_url else os.environ.get("PREFECT_API_URL")
    if not url:
        raise ConfigurationError("no Prefect API to send events to: set PREFECT_API_URL (or TOLLWATCH_PREFECT_API_URL)")
    return url


def event_emitter(settings: Settings, http: httpx.Client | None = None) -> EventSink:
    """Events to Prefect: the Cloud webhook when `prefect_webhook_url` is set, else the events API.

    Pass `http` to own (and close) the connection pool; otherwise one is created for the emitter's lifetime.
    """
    key = _secret(settings.prefect_api_key) or _env_secret("PREFECT_API_KEY")
    http = http or emit_http_client(settings)
    retry = {"max_attempts": settings.emit_max_attempts, "backoff_max_s": settings.emit_backoff_max_s}
    if settings.prefect_webhook_url:
        return WebhookEmitter(http, settings.prefect_webhook_url.get_secret_value(), api_key=key, **retry)
    auth = _secret(settings.prefect_api_auth_string) or _env_secret("PREFECT_API_AUTH_STRING")
    return PrefectEventsEmitter(http, prefect_api_url(settings), api_key=key, auth_string=auth, **retry)


def emit_http_client(settings: Settings) -> httpx.Client:
    """The HTTP client for event delivery: short timeouts, because a caller (Event Grid) is waiting."""
    return httpx.Client(timeout=httpx.Timeout(settings.emit_timeout_s, connect=5.0), verify=tls_context())


def state_blobs(settings: Settings, service: BlobServiceClient | None = None) -> JsonBlobStore:
    """Conditional JSON state (watermark, sequencers) in the tollwatch container."""
    return JsonBlobStore((service or blob_service(settings)).get_container_client(settings.storage_container))


def watermark_store(settings: Settings, blobs: JsonBlobStore | None = None) -> WatermarkStore:
    return WatermarkStore(
        blobs or state_blobs(settings),
        domain=settings.upstream_domain,
        dataset_id=settings.upstream_dataset_id,
        state_prefix=settings.state_prefix,
    )


@contextmanager
def upstream_watcher(settings: Settings) -> Iterator[UpstreamWatcher]:
    """A watcher with its own connections, closed when the invocation ends (no sockets leak between ticks)."""
    with ExitStack() as stack:
        service = stack.enter_context(blob_service(settings))
        upstream_http = stack.enter_context(build_http_client(settings.upstream_url, settings.upstream_timeout_s))
        emit_http = stack.enter_context(emit_http_client(settings))
        yield UpstreamWatcher(
            socrata_client(settings, upstream_http),
            watermark_store(settings, state_blobs(settings, service)),
            event_emitter(settings, emit_http),
        )


@contextmanager
def eventgrid_receiver(settings: Settings) -> Iterator[EventGridReceiver]:
    """An Event Grid receiver with its own connections, closed when the invocation ends."""
    with ExitStack() as stack:
        blobs = state_blobs(settings, stack.enter_context(blob_service(settings)))
        emit_http = stack.enter_context(emit_http_client(settings))
        yield EventGridReceiver(
            ReceiverPolicy.from_settings(settings),
            SequencerStore(blobs, state_prefix=settings.state_prefix),
            watermark_store(settings, blobs),
            event_emitter(settings, emit_http),
        )


@contextmanager
def emitter_for_invocation(settings: Settings) -> Iterator[EventSink]:
    """An event sink whose connections close when the invocation ends."""
    with emit_http_client(settings) as http:
        yield event_emitter(settings, http)


def completion_publisher(settings: Settings, credential: Any = None) -> CompletionPublisher | None:
    """The Event Grid topic publisher, or None when no topic is configured (publishing is optional)."""
    if settings.eventgrid_topic_endpoint is None:
        return None
    # imported here: only the (optional) publishing path needs the Event Grid SDK
    from azure.eventgrid import EventGridPublisherClient

    from tollwatch.adapters.eventgrid_out import CompletionPublisher

    if settings.eventgrid_topic_key is not None:
        from azure.core.credentials import AzureKeyCredential

        credential = AzureKeyCredential(settings.eventgrid_topic_key.get_secret_value())
    else:
        credential = credential or azure_credential()
    client = EventGridPublisherClient(str(settings.eventgrid_topic_endpoint), credential)
    return CompletionPublisher(client, source=settings.eventgrid_event_source)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def _env_secret(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


class Resources:
    """Every client one process needs, built once from one `Settings` on first use, and closed together.

    Why: each flow task used to load the settings and build its own clients, so a run opened a new connection
    pool per task (never closed) and, on Azure, a DefaultAzureCredential per blob client, each fetching its
    own token. A flow builds one `Resources` and hands it to its tasks; `with Resources(...)` closes the HTTP
    pools, the blob service and the credential when the run ends.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._closing = ExitStack()
        self._identities: dict[str, Any] = {}

    @cached_property
    def credential(self) -> Any:
        """Entra ID, built only when an Azure client without a key or connection string asks for it."""
        return self._closing.enter_context(azure_credential())

    def identity(self, client_id: str | None = None) -> Any:
        """The process's credential (`credential`), or a user-assigned identity's when `client_id` names one: one
        credential per identity, so each identity's tokens are cached and refreshed once, and all are closed
        together."""
        if not client_id:
            return self.credential
        if client_id not in self._identities:
            self._identities[client_id] = self._closing.enter_context(azure_credential(client_id))
        return self._identities[client_id]

    @cached_property
    def blob_service(self) -> BlobServiceClient:
        uses_identity = not self.settings.storage_connection_string and self.settings.storage_account_url
        service = blob_service(self.settings, self.credential if uses_identity else None)
        return self._closing.enter_context(service)

    @cached_property
    def landing(self) -> LandingZone:
        return landing_zone(self.settings, self.blob_service)

    @cached_property
    def socrata(self) -> SocrataClient:
        http = build_http_client(self.settings.upstream_url, self.settings.upstream_timeout_s)
        return socrata_client(self.settings, self._closing.enter_context(http))

    @cached_property
    def events(self) -> EventSink:
        return event_emitter(self.settings, self._closing.enter_context(emit_http_client(self.settings)))

    @cached_property
    def table(self) -> IcebergTableStore:
        """The bronze table (its catalog is opened once per process)."""
        return table_store(self.settings)

    @cached_property
    def branches(self) -> Branches:
        """The bronze table's audit branches and held loads (write-audit-publish)."""
        from tollwatch.core.branches import Branches

        return Branches(self.table)

    @cached_property
    def quality_spec(self) -> QualitySpec:
        """The checks every load is audited by (read once per run, so every attempt is judged alike)."""
        return load_spec(self.settings.quality_spec)

    def table_named(self, identifier: str) -> IcebergTableStore:
        """Another table in the same catalog (a downstream job's output)."""
        return table_store(self.settings, identifier)

    @cached_property
    def completion_publisher(self) -> CompletionPublisher | None:
        return completion_publisher(self.settings, self.credential if self._topic_uses_identity() else None)

    def _topic_uses_identity(self) -> bool:
        return self.settings.eventgrid_topic_endpoint is not None and self.settings.eventgrid_topic_key is None

    def close(self) -> None:
        self._closing.close()

    def __enter__(self) -> Resources:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
