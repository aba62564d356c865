"""Where tollwatch's Spark jobs run unless told otherwise: compute and Iceberg-catalog defaults, stated once.

The Prefect blocks (`DatabricksCompute`, `SparkIcebergCatalog`), the Jobs API model
(`tollwatch.adapters.databricks_jobs.ComputeSpec`) and the Databricks bundle's Python resources (`resources/`) all
take their defaults from here, so none of them restates another's. Standard library only, like the rest of
`tollwatch.contract`: a cluster imports it beside pyspark.
"""

from __future__ import annotations

#: Databricks Runtime 15.4 LTS: Spark 3.5 and Scala 2.12, which the Iceberg runtime below is built for.
SPARK_VERSION = "15.4.x-scala2.12"
#: Azure, 4 vCPU / 16 GiB with local NVMe: enough for a year of hourly rows per merge.
NODE_TYPE_ID = "Standard_D4ds_v5"
NUM_WORKERS = 2
#: The serverless environment (client) version tasks run in when compute is serverless.
SERVERLESS_ENVIRONMENT_VERSION = "2"

#: Iceberg's Spark runtime from Maven Central: Spark 3.5, Scala 2.12 (matches SPARK_VERSION and local pyspark 3.5).
ICEBERG_SPARK_RUNTIME = "org.apache.iceberg:iceberg-spark-runtime-3.5_2.12:1.10.2"
#: The Spark catalog name tollwatch's Iceberg tables are addressed through (`tollwatch.bronze.…`).
CATALOG = "tollwatch"
ICEBERG_SPARK_CATALOG = "org.apache.iceberg.spark.SparkCatalog"
ICEBERG_SQL_EXTENSIONS = "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions"


def hadoop_catalog_spark_conf(warehouse: str, catalog: str = CATALOG) -> dict[str, str]:
    """The Spark conf that makes `catalog` an Iceberg Hadoop catalog with its tables under `warehouse`
    (e.g. abfss://<container>@<account>.dfs.core.windows.net/warehouse), with Iceberg's SQL extensions."""
    prefix = f"spark.sql.catalog.{catalog}"
    return {
        "spark.sql.extensions": ICEBERG_SQL_EXTENSIONS,
        prefix: ICEBERG_SPARK_CATALOG,
        f"{prefix}.type": "hadoop",
        f"{prefix}.warehouse": warehouse,
    }
