"""tollwatch: event-driven ingestion of MTA Bridges & Tunnels hourly traffic."""

import os

# pyarrow's default pool (mimalloc) keeps freed pages: loading a year peaked ~90 MiB higher with it (bench/).
# pyarrow reads this once, when it is imported, so it is set here, before any tollwatch module imports pyarrow.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
