"""Adapters: tollwatch's side of every external system, one module each.

Socrata (upstream), Prefect's events API, Event Grid in (deliveries) and out (the completion topic), JSON state
in Blob storage, the Databricks Jobs API's models, spark-submit, and the one outbound HTTP retry policy (`net`).
Adapters import the contract only.
"""
