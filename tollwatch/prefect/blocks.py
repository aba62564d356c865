"""Prefect blocks for running on Databricks: where Spark runs, where the data lives, which catalog it writes.

Register them once per workspace with `prefect block register -m tollwatch.prefect.blocks`; the credentials block comes
from prefect-databricks itself (`DatabricksCredentials`: service-principal OAuth preferred, PAT fallback).
Blocks hold names and URLs, never secrets of their own: the only secret (the Databricks credential) lives in
the prefect-databricks block as a `SecretStr`, so nothing here can leak one into a log or an event.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from prefect.blocks.core import Block
from pydantic import Field, model_validator

from tollwatch.adapters.databricks_jobs import ComputeSpec
from tollwatch.contract import compute


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
