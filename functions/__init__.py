"""Azure Functions handlers (Python v2 model), one module per job; `function_app.py` registers them.

Handlers stay thin — parse, call the core in `tollwatch`, emit, respond — and never import prefect: events
reach Prefect over plain HTTP (`tollwatch.adapters.prefect_events`), which keeps cold starts short and the image small.
"""

import logging

# httpx logs every request URL at INFO, and a Prefect Cloud webhook URL is a credential; the Azure SDK logs
# each storage request. Warnings and errors from both still come through.
for _noisy in ("httpx", "httpcore", "azure"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
