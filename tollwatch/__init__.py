"""tollwatch: event-driven ingestion of MTA Bridges & Tunnels hourly traffic."""
