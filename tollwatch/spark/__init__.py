"""The Spark writer: tollwatch's table contract merged with Spark into Iceberg (a wheel entry point on a cluster).

Imports pyspark and `tollwatch.contract` only (plus azure-storage-blob, lazily, when a landing sits in the Azurite
emulator), so it runs on a Databricks runtime, EMR, Dataproc or `spark-submit --master local[*]` alike.
"""
