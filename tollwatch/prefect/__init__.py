"""The Prefect side: flows, blocks, the automations compiler, deployment, and reading back what happened
(observe, follow, trace). `internals` is the one door to Prefect's private and server-side APIs.

Named after the system it adapts to; inside it `import prefect` still means the Prefect distribution (absolute
imports), never this package.
"""
