"""The one place that turns settings into I/O clients.

Everything else receives clients as arguments, so tests and the local stack swap endpoints by settings,
never by patching, and production auth (DefaultAzureCredential, app tokens, API keys) lives here only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx
from azure.storage.blob import BlobServiceClient
from pydantic import SecretStr

from tollwatch.emit import PrefectEventsEmitter
from tollwatch.landing import LandingZone
from tollwatch.settings import Settings
from tollwatch.socrata import SocrataClient, build_http_client


class ConfigurationError(RuntimeError):
    """A setting is missing or inconsistent; the message says which and how to fix it."""


def blob_service(settings: Settings) -> BlobServiceClient:
    """Azurite/key auth by connection string, or Entra ID (DefaultAzureCredential) by account URL."""
    if settings.storage_connection_string:
        return BlobServiceClient.from_connection_string(settings.storage_connection_string.get_secret_value())
    if settings.storage_account_url:
        from azure.identity import DefaultAzureCredential  # imported lazily: slow, and only for Azure

        return BlobServiceClient(str(settings.storage_account_url), credential=DefaultAzureCredential())
    raise ConfigurationError(
        "no blob storage configured: set TOLLWATCH_STORAGE_CONNECTION_STRING (Azurite, or key auth) "
        "or TOLLWATCH_STORAGE_ACCOUNT_URL (Entra ID); `tollwatch stack up` prints the local values"
    )


def landing_zone(settings: Settings) -> LandingZone:
    return LandingZone(blob_service(settings).get_container_client(settings.storage_container))


def socrata_client(settings: Settings) -> SocrataClient:
    token = settings.upstream_app_token.get_secret_value() if settings.upstream_app_token else None
    return SocrataClient(
        build_http_client(settings.upstream_url, settings.upstream_timeout_s),
        app_token=token,
        max_attempts=settings.upstream_max_attempts,
        backoff_max_s=settings.upstream_backoff_max_s,
    )


def table_store(settings: Settings):  # -> IcebergTableStore (pyiceberg imported lazily: heavy)
    from tollwatch.table import IcebergTableStore

    if not settings.catalog_properties:
        settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
    return IcebergTableStore.from_properties(
        settings.catalog_name, settings.resolved_catalog_properties(), settings.table
    )


def prefect_api_url(settings: Settings) -> str:
    url = str(settings.prefect_api_url) if settings.prefect_api_url else os.environ.get("PREFECT_API_URL")
    if not url:
        raise ConfigurationError("no Prefect API to send events to: set PREFECT_API_URL (or TOLLWATCH_PREFECT_API_URL)")
    return url


def event_emitter(settings: Settings) -> PrefectEventsEmitter:
    key = _secret(settings.prefect_api_key) or _env_secret("PREFECT_API_KEY")
    auth = _secret(settings.prefect_api_auth_string) or _env_secret("PREFECT_API_AUTH_STRING")
    return PrefectEventsEmitter(
        httpx.Client(timeout=httpx.Timeout(15.0, connect=5.0)),
        prefect_api_url(settings),
        api_key=key,
        auth_string=auth,
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def _env_secret(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


@dataclass
class Clients:
    """The clients an ingest run needs, built together."""

    socrata: SocrataClient
    landing: LandingZone
    emitter: PrefectEventsEmitter

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        return cls(socrata_client(settings), landing_zone(settings), event_emitter(settings))
