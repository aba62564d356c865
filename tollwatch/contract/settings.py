"""Settings, read once from `TOLLWATCH_*` environment variables (or a `.env` file).

Secrets (app token, storage connection string, Prefect API key and webhook URL, Event Grid shared secrets
and topic key, the dev host's function key) are `SecretStr`: they never show up in `repr`, logs or events.
Switching from the local stack to Azure/data.ny.gov is a matter of settings only. List settings are comma
separated (`TOLLWATCH_EVENTGRID_SECRETS=current,next`), since Azure app settings are flat strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AnyHttpUrl, BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_STATE_DIR = Path(".tollwatch")


def _comma_separated(value: object) -> object:
    """App settings are flat strings: `a, b` means two values (a JSON list is accepted too)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            return value  # JSON list: let pydantic parse it
        return [part.strip() for part in stripped.split(",") if part.strip()]
    return value


#: A list setting written as `a,b` in the environment (Azure app settings cannot hold JSON comfortably).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]
SecretList = Annotated[list[SecretStr], NoDecode, BeforeValidator(_comma_separated)]


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
    storage_retry_total: int = Field(
        3,
        ge=0,
        le=10,
        description="storage SDK retries per request (its backoff starts at 15 s; webhooks must "
        "answer Event Grid within 30 s, so keep this low there)",
    )

    # table (Iceberg through pyiceberg)
    catalog_name: str = "tollwatch"
    catalog_properties: dict[str, str] = Field(
        default_factory=dict,
        description="pyiceberg catalog properties (JSON); empty = SQL catalog on SQLite under warehouse_dir",
    )
    warehouse_dir: Path = Field(DEFAULT_STATE_DIR / "warehouse", description="local catalog + data files")
    table: str = Field("bronze.bnt_traffic_hourly", pattern=r"^[A-Za-z_][\w]*\.[A-Za-z_][\w]*$")
    daily_totals_table: str = Field(
        "silver.bnt_daily_totals",
        pattern=r"^[A-Za-z_][\w]*\.[A-Za-z_][\w]*$",
        description="output of the local `daily_totals` job, in the same catalog as `table`",
    )

    # where the merge runs: in the flow's process (pyiceberg), with spark-submit on any Spark master, or on Databricks
    # (both Spark engines run the wheel's `tollwatch-merge` entry point: tollwatch.spark.merge)
    engine: Literal["local", "spark", "databricks"] = Field(
        "local", description="local pyiceberg writer, spark-submit to spark_master, or Databricks"
    )
    spark_master: str = Field("local[*]", description="engine=spark: any Spark master URL (local[*], spark://, yarn)")
    spark_submit: str = Field("spark-submit", description="engine=spark: the spark-submit command (pyspark ships one)")
    spark_jars_dir: Path = Field(
        Path(".jars"), description="engine=spark: the Iceberg Spark runtime + SQLite JDBC jars (`make jars`)"
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="engine=spark: extra Spark conf (JSON); for a catalog other than the local SQL catalog, its conf",
    )
    databricks_credentials_block: str = Field(
        "tollwatch-databricks",
        pattern=r"^([a-z0-9-]+/)?[a-z0-9][a-z0-9-]*$",
        description="who calls the workspace, as `<block type>/<name>`: `tollwatch-databricks-identity/<name>` (the "
        "worker's managed identity, no secret; production) or a bare name / `databricks-credentials/<name>` "
        "(prefect-databricks' DatabricksCredentials: client secret or PAT, the fallback)",
    )
    databricks_compute_block: str = Field("tollwatch", description="tollwatch-databricks-compute block name")
    databricks_storage_block: str = Field("tollwatch", description="tollwatch-azure-storage-location block name")
    databricks_catalog_block: str = Field("tollwatch", description="tollwatch-spark-iceberg-catalog block name")
    databricks_wheel: str = Field(
        "/Workspace/Shared/tollwatch/artifacts/.internal/tollwatch-0.1.0-py3-none-any.whl",
        description="the tollwatch wheel on the workspace, installed on the merge's cluster (where `databricks "
        "bundle deploy` put it: <bundle root>/artifacts/.internal/<wheel>; a /Volumes/ or dbfs:/ path works too)",
    )
    databricks_max_wait_s: float = Field(3600.0, gt=0, description="longer than this: cancel the run and fail")
    databricks_poll_s: float = Field(10.0, ge=0, description="seconds between jobs/runs/get polls")
    databricks_api_retries: int = Field(4, ge=0, le=10, description="retries of each Jobs API call on 429/5xx")
    databricks_api_backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles each retry")

    # write-audit-publish (tollwatch.contract.quality)
    quality_spec: Path | None = Field(
        None, description="the load checks' YAML (thresholds, severities); unset: the BNT defaults in the package"
    )

    # flow task retries (on top of the per-request retries of each client)
    task_retries: int = Field(2, ge=0, le=10, description="retries of each ingest task")
    task_retry_delay_s: float = Field(10.0, ge=0, description="seconds between task retries")

    # events (Prefect API over HTTP; see tollwatch.adapters.prefect_events)
    prefect_api_url: AnyHttpUrl | None = Field(None, description="defaults to PREFECT_API_URL")
    prefect_api_key: SecretStr | None = Field(None, description="Prefect Cloud API key (Bearer)")
    prefect_api_auth_string: SecretStr | None = Field(None, description="self-hosted basic auth 'user:pass'")
    prefect_webhook_url: SecretStr | None = Field(
        None,
        description="Prefect Cloud webhook (pass-through template) to send events to instead of the events API; "
        "the opaque URL is a credential, hence secret. prefect_api_key is sent as Bearer when set",
    )
    emit_max_attempts: int = Field(4, ge=1, le=10, description="tries per event delivery (transient errors only)")
    emit_backoff_max_s: float = Field(4.0, gt=0, description="longest pause between delivery tries")
    emit_timeout_s: float = Field(10.0, gt=0, description="per-request timeout of event delivery")

    # state blobs (watermark, Event Grid sequencers) in storage_container
    state_prefix: str = Field("state", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-/]*[A-Za-z0-9]$")

    # Event Grid in (webhook route and trigger)
    eventgrid_secrets: SecretList = Field(
        default_factory=list,
        description="shared secrets for the webhook route (header X-Tollwatch-Secret or query `secret`), comma "
        "separated; two are accepted so a secret can be rotated without downtime; empty = function key only",
    )
    eventgrid_source_topics: CommaList = Field(
        default_factory=list,
        description="accepted Event Grid `topic` / CloudEvents `source` values (the storage account resource "
        "ids), comma separated, case-insensitive; empty = any topic",
    )
    eventgrid_subscription_names: CommaList = Field(
        default_factory=list,
        description="Event Grid subscriptions allowed to deliver to the webhook route (their `aeg-subscription-name` "
        "header), comma separated, case-insensitive; others are refused with 403; empty = any subscription",
    )
    eventgrid_container: str = Field(
        "upstream",
        pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$",
        description="container whose blobs signal a publish",
    )
    eventgrid_blob_prefix: str = Field("", description="only blobs whose name starts with this signal a publish")
    eventgrid_allowed_origins: CommaList = Field(
        default_factory=lambda: ["eventgrid.azure.net"],
        description="WebHook-Request-Origin values granted in the CloudEvents OPTIONS handshake ('*' = any)",
    )
    eventgrid_max_body_bytes: int = Field(1_048_576, ge=1024, description="Event Grid batches are at most 1 MB")

    # completions out to an Event Grid topic
    eventgrid_topic_endpoint: AnyHttpUrl | None = Field(
        None, description="publish tollwatch.ingestion.completed here as CloudEvents; unset = do not publish"
    )
    eventgrid_topic_key: SecretStr | None = Field(
        None, description="topic access key; unset = Entra ID (DefaultAzureCredential)"
    )
    eventgrid_event_source: str = Field("/tollwatch", min_length=1, description="CloudEvents `source` of completions")

    # backfill requests
    backfill_max_days: int = Field(3660, ge=1, description="longest range one backfill request may cover")
    backfill_max_chunks: int = Field(400, ge=1, description="most chunk events (= flow runs) one request may create")
    backfill_target_rows: int = Field(
        1_000_000,
        ge=1,
        description="`auto` chunking: whole months per run up to this many upstream rows (a run costs ~1.7 s of "
        "orchestration; 1M rows are ~15 s of work at ~65k rows/s)",
    )

    # local Functions dev host (in Azure the Functions host manages keys)
    function_key: SecretStr | None = Field(None, description="key `tollwatch functions serve` requires")

    @model_validator(mode="after")
    def _one_storage_auth(self) -> Self:
        if self.storage_connection_string and self.storage_account_url:
            raise ValueError("set either storage_connection_string or storage_account_url, not both")
        return self

    @model_validator(mode="after")
    def _outputs_are_not_bronze(self) -> Self:
        """A job replaces days of its output table: pointed at bronze, it would delete the ingested rows."""
        if self.daily_totals_table == self.table:
            raise ValueError(f"daily_totals_table must differ from table ({self.table})")
        return self

    @field_validator("eventgrid_secrets")
    @classmethod
    def _rotation_not_sprawl(cls, secrets: list[SecretStr]) -> list[SecretStr]:
        """Two secrets make a rotation (current and next); more would be forgotten, never-revoked ones."""
        if len(secrets) > 2:
            raise ValueError(f"at most two secrets (current and next) are accepted at a time, got {len(secrets)}")
        return secrets

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

    @property
    def ledger_in_reach(self) -> bool:
        """Whether this process can read the table (its ledger, its rows) through pyiceberg: with the local and the
        spark engines both commit to the catalog `catalog_properties` names; Databricks' catalog is its own."""
        return self.engine != "databricks"

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
