"""Prefect blocks for running on Databricks: who calls the workspace, where Spark runs, where the data lives, which
catalog it writes.

Register them once per workspace with `prefect block register -m tollwatch.prefect.blocks`. The workspace is called
as the worker's managed identity (`DatabricksIdentity`: an Entra ID token, no secret stored anywhere); the fallback
is prefect-databricks' own `DatabricksCredentials` block (a service principal's client secret, or a PAT).
Blocks hold names, ids and URLs, never secrets of their own: the only secret there can be (the fallback's) lives in
the prefect-databricks block as a `SecretStr`, so nothing here can leak one into a log or an event.
"""

from __future__ import annotations

from typing import Any, Literal, Self

import httpx
from azure.core.exceptions import ClientAuthenticationError
from prefect.blocks.core import Block
from prefect_databricks import DatabricksCredentials
from pydantic import Field, PrivateAttr, model_validator

from tollwatch.adapters.databricks_jobs import AZURE_DATABRICKS_SCOPE, ComputeSpec, DatabricksAuthError
from tollwatch.contract import compute


class DatabricksIdentity(Block):
    """The Azure Databricks workspace, called as a managed (or workload) identity: no secret, nothing to rotate.

    prefect-databricks' tasks take a `databricks_credentials` object and only ever call its `get_client()`; this
    block answers that call with prefect-databricks' own client (its base URL, user agent and headers) carrying an
    Entra ID access token for the Azure Databricks resource, fetched through azure-identity's
    `DefaultAzureCredential`. The credential is kept, so its token cache serves every call until the token is
    within five minutes of expiry and then fetches the next one: one token request per hour, not one per call.
    The token lives in that cache only; the saved block holds the workspace host and, optionally, which
    user-assigned identity to use.
    """

    _block_type_name = "tollwatch Databricks identity"
    _block_type_slug = "tollwatch-databricks-identity"
    _description = (
        "Azure Databricks workspace host, called with an Entra ID token of the worker's managed identity "
        "(no client secret, no PAT)."
    )

    databricks_instance: str = Field(
        pattern=r"^[A-Za-z0-9.-]+(:\d+)?$",
        description="workspace host, e.g. adb-1234567890123456.7.azuredatabricks.net (no https://)",
    )
    managed_identity_client_id: str | None = Field(
        default=None,
        description="a user-assigned identity's client id (not a secret); unset: AZURE_CLIENT_ID, else the "
        "system-assigned identity",
    )

    _credential: Any = PrivateAttr(default=None)

    def use_credential(self, credential: Any) -> Self:
        """Take the process's credential (`Resources.identity`) instead of building one: one token cache per
        identity and process, closed with the process's other clients."""
        self._credential = credential
        return self

    def access_token(self) -> str:
        """A current Entra ID token for the Azure Databricks resource (from the credential's cache while it is
        fresh)."""
        if self._credential is None:
            from tollwatch.resources import azure_credential

            self._credential = azure_credential(self.managed_identity_client_id)
        try:
            return str(self._credential.get_token(AZURE_DATABRICKS_SCOPE).token)
        except ClientAuthenticationError as error:  # also azure-identity's CredentialUnavailableError
            who = self.managed_identity_client_id or "the process's identity"
            raise DatabricksAuthError(
                f"no Entra ID token for Azure Databricks ({self.databricks_instance}) as {who}: "
                f"{type(error).__name__}: {error}"
            ) from error

    def get_client(self) -> httpx.AsyncClient:
        """What prefect-databricks' tasks call: its own client, authenticated with the identity's current token."""
        bearer = DatabricksCredentials(databricks_instance=self.databricks_instance, token=self.access_token())
        return bearer.get_client()


class DatabricksCompute(Block):
    """Where the merge runs: an existing all-purpose cluster, a job cluster created per run, or serverless."""

    _block_type_name = "tollwatch Databricks compute"
    _block_type_slug = "tollwatch-databricks-compute"
    _description = "Existing cluster id, job-cluster spec or serverless environment for tollwatch's Spark jobs."

    kind: Literal["existing_cluster", "job_cluster", "serverless"] = "job_cluster"
    existing_cluster_id: str | None = Field(default=None, description="kind=existing_cluster")
    spark_version: str = Field(default=compute.SPARK_VERSION, description="kind=job_cluster")
    node_type_id: str = Field(default=compute.NODE_TYPE_ID, description="kind=job_cluster")
    num_workers: int = Field(default=compute.NUM_WORKERS, ge=0, description="kind=job_cluster")
    spark_conf: dict[str, str] = Field(default_factory=dict, description="kind=job_cluster, e.g. Iceberg extensions")
    libraries: list[dict[str, Any]] = Field(
        default_factory=list, description='e.g. [{"maven": {"coordinates": "org.apache.iceberg:…"}}]'
    )
    serverless_environment_version: str = Field(
        default=compute.SERVERLESS_ENVIRONMENT_VERSION, description="kind=serverless (client version)"
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        self.spec()  # the same rules as the core model, so a bad block fails when it is saved
        return self

    def spec(self) -> ComputeSpec:
        return ComputeSpec.model_validate(self.model_dump(include=set(ComputeSpec.model_fields)))


class AzureStorageLocation(Block):
    """The landing container, addressed the way Spark (abfss://) and HTTP clients (https://) need it."""

    _block_type_name = "tollwatch Azure storage location"
    _block_type_slug = "tollwatch-azure-storage-location"
    _description = "Storage account + container of tollwatch's landing zone (and the Hadoop-catalog warehouse)."

    account: str = Field(pattern=r"^[a-z0-9]{3,24}$", description="storage account name")
    container: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?$")
    dfs_suffix: str = Field(default="dfs.core.windows.net", description="sovereign clouds differ")

    def abfss(self, path: str = "") -> str:
        return f"abfss://{self.container}@{self.account}.{self.dfs_suffix}/{path.lstrip('/')}"

    def https(self, path: str = "") -> str:
        blob_suffix = self.dfs_suffix.replace(".dfs.", ".blob.")
        return f"https://{self.account}.{blob_suffix}/{self.container}/{path.lstrip('/')}"


class SparkIcebergCatalog(Block):
    """The Iceberg catalog Spark writes through: a Hadoop catalog on abfss (as locally) or Unity Catalog."""

    _block_type_name = "tollwatch Spark Iceberg catalog"
    _block_type_slug = "tollwatch-spark-iceberg-catalog"
    _description = "Hadoop catalog on abfss, or a Unity Catalog catalog, for tollwatch's bronze table."

    kind: Literal["hadoop", "unity"] = "hadoop"
    catalog: str = Field(default=compute.CATALOG, pattern=r"^[A-Za-z_]\w*$", description="Spark catalog name")
    warehouse: str | None = Field(default=None, description="kind=hadoop: abfss://…/warehouse")

    @model_validator(mode="after")
    def _warehouse_for_hadoop(self) -> Self:
        if self.kind == "hadoop" and not (self.warehouse or "").startswith("abfss://"):
            raise ValueError("a Hadoop catalog needs warehouse=abfss://<container>@<account>.dfs.core.windows.net/…")
        return self

    def spark_conf(self) -> dict[str, str]:
        """What the cluster needs to see the catalog (Unity Catalog needs nothing: it is the default)."""
        if self.kind == "unity":
            return {}
        return compute.hadoop_catalog_spark_conf(str(self.warehouse), self.catalog)

    def table(self, identifier: str) -> str:
        return f"{self.catalog}.{identifier}"
