"""Settings, read once from `TOLLWATCH_*` environment variables (or a `.env` file).

Secrets (app token, storage connection string, Prefect API key) are `SecretStr`: they never show up in
`repr`, logs or events. Switching from the local stack to Azure/data.ny.gov is a matter of settings only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path(".tollwatch")


class Settings(BaseSettings):
    """Everything tollwatch needs to reach the upstream, the storage and the table."""

    model_config = SettingsConfigDict(env_prefix="TOLLWATCH_", env_file=".env", extra="ignore")

    # upstream (Socrata)
    upstream_domain: str = Field("data.ny.gov", description="Socrata domain; names the dataset resource")
    upstream_dataset_id: str = Field("qzve-kjga", pattern=r"^[a-z0-9]{4}-[a-z0-9]{4}$")
    upstream_base_url: AnyHttpUrl | None = Field(
        None, description="override the base URL (the local mirror); default https://<upstream_domain>"
    )
    upstream_app_token: SecretStr | None = Field(None, description="Socrata X-App-Token (raises rate limits)")
    upstream_page_size: int = Field(10_000, ge=1, le=50_000, description="rows per request (10k measured fastest here)")
    upstream_timeout_s: float = Field(60.0, gt=0)
    upstream_max_attempts: int = Field(6, ge=1, le=20)
    upstream_backoff_max_s: float = Field(60.0, gt=0)

    # storage (Azure Blob / Azurite)
    storage_connection_string: SecretStr | None = Field(None, description="Azurite or key-based auth")
    storage_account_url: AnyHttpUrl | None = Field(
        None, description="https://<account>.blob.core.windows.net, authenticated by DefaultAzureCredential"
    )
    storage_container: str = Field("tollwatch", pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")

    # table (Iceberg through pyiceberg)
    catalog_name: str = "tollwatch"
    catalog_properties: dict[str, str] = Field(
        default_factory=dict,
        description="pyiceberg catalog properties (JSON); empty = SQL catalog on SQLite under warehouse_dir",
    )
    warehouse_dir: Path = Field(DEFAULT_STATE_DIR / "warehouse", description="local catalog + data files")
    table: str = Field("bronze.bnt_traffic_hourly", pattern=r"^[A-Za-z_][\w]*\.[A-Za-z_][\w]*$")

    # flow task retries (on top of the per-request retries of each client)
    task_retries: int = Field(2, ge=0, le=10, description="retries of each ingest task")
    task_retry_delay_s: float = Field(10.0, ge=0, description="seconds between task retries")

    # events (Prefect API over HTTP; see tollwatch.emit)
    prefect_api_url: AnyHttpUrl | None = Field(None, description="defaults to PREFECT_API_URL")
    prefect_api_key: SecretStr | None = Field(None, description="Prefect Cloud API key (Bearer)")
    prefect_api_auth_string: SecretStr | None = Field(None, description="self-hosted basic auth 'user:pass'")

    @model_validator(mode="after")
    def _one_storage_auth(self) -> Self:
        if self.storage_connection_string and self.storage_account_url:
            raise ValueError("set either storage_connection_string or storage_account_url, not both")
        return self

    @property
    def upstream_url(self) -> str:
        """Base URL of the Socrata API (the mirror locally, https://data.ny.gov in production)."""
        if self.upstream_base_url:
            return str(self.upstream_base_url).rstrip("/")
        return f"https://{self.upstream_domain}"

    @property
    def table_namespace(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def table_name(self) -> str:
        return self.table.split(".", 1)[1]

    def resolved_catalog_properties(self) -> dict[str, str]:
        """Catalog properties; the default is a SQL catalog on SQLite next to a file warehouse."""
        if self.catalog_properties:
            return dict(self.catalog_properties)
        warehouse = self.warehouse_dir.resolve()
        return {
            "type": "sql",
            "uri": f"sqlite:///{warehouse / 'catalog.db'}",
            "warehouse": warehouse.as_uri(),
        }


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; keyword overrides win (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
