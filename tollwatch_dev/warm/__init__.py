"""A warm execution path for flow runs: a pre-imported process forks one child per run.

Why: on this machine a process worker spends ~2.5 s of every run starting a fresh Python and importing
prefect, pyarrow and pyiceberg before the flow's first line. The Prefect deployment, trigger, worker and
run states stay exactly as they are; only the command the worker starts changes, from
`python -m prefect.engine` to `python -m tollwatch_dev.warm.client`, a tiny process that asks the warm server
(`python -m tollwatch_dev.warm.server`, started beside the worker) to fork a child that already has everything
imported and then runs Prefect's own engine entry point in it.
"""
