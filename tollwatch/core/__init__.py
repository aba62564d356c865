"""The core: what tollwatch does, over narrow interfaces.

Ingest (fetch, reconcile, merge), the landing zone, the Iceberg table and its ledger, the watermark, the Event
Grid receiver, backfill planning and the audit. It imports the contract and the adapters it is handed; it never
imports Prefect's orchestration side, the Functions handlers, the CLI or the dev tools.
"""
