"""Search everything the pipeline leaves behind for secret values (issue 17, part 5: prove nothing leaks).

A test runs the chain with a distinctive marker as every secret, then feeds this scanner every place a value could
end up: log files, the Prefect server's events, artifacts, flow runs (parameters, state messages), flow-run logs,
deployments (job variables), block documents and variables, every landed blob, and the output of each CLI command
it ran. A marker is searched for as itself and base64'd (the form an `Authorization: Basic` header or a careless
encoder would carry). `found` lists where a marker showed up, naming the marker, never printing its value;
`coverage` counts what was searched, so the closing note (and a reader of the test) can see the scan was not empty.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: Prefect API collections searched, with the filter body each takes (paged by `offset` where the API allows).
PREFECT_COLLECTIONS: dict[str, dict[str, Any]] = {
    "artifacts": {},
    "flow_runs": {},
    "task_runs": {},
    "logs": {},
    "deployments": {},
    "block_documents": {"include_secrets": False},
    "variables": {},
    "automations": {},
}
PAGE = 200


@dataclass(frozen=True)
class Leak:
    """One marker seen in one place (the marker's name, never its value)."""

    where: str
    marker: str


@dataclass
class LeakScan:
    """`scan = LeakScan({"function key": "…", …})`, feed it, then `assert scan.found == []`."""

    markers: Mapping[str, str]
    found: list[Leak] = field(default_factory=list)
    coverage: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        short = [name for name, value in self.markers.items() if len(value) < 12]
        if short:  # a short marker would match by accident and prove nothing
            raise ValueError(f"markers must be at least 12 characters: {', '.join(short)}")
        self._needles = [
            (name, needle)
            for name, value in self.markers.items()
            for needle in {value.encode(), base64.b64encode(value.encode()), base64.urlsafe_b64encode(value.encode())}
        ]

    def bytes(self, where: str, data: bytes, *, kind: str) -> None:
        """Search one document; `kind` groups it in `coverage` (e.g. "log file", "event")."""
        self.coverage[kind] += 1
        for name, needle in self._needles:
            if needle in data:
                self.found.append(Leak(where, name))

    def text(self, where: str, text: str, *, kind: str) -> None:
        self.bytes(where, text.encode(), kind=kind)

    def files(self, root: Path, *, kind: str = "log file") -> None:
        """Every regular file under `root` (logs, the warehouse's metadata, …)."""
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.bytes(str(path), path.read_bytes(), kind=kind)

    def prefect(self, api_url: str, headers: Mapping[str, str]) -> None:
        """Every event and every object of `PREFECT_COLLECTIONS` the server holds."""
        with httpx.Client(base_url=api_url.rstrip("/"), headers=dict(headers), timeout=60) as http:
            for event in _events(http):
                self.text(f"event {event.get('id')} ({event.get('event')})", json.dumps(event), kind="event")
            for collection, body in PREFECT_COLLECTIONS.items():
                for item in _paged(http, collection, body):
                    self.text(f"{collection} {item.get('id', '')}", json.dumps(item), kind=collection)

    def blobs(self, connection_string: str) -> None:
        """Every blob of every container of the account (landed pages, manifests, state documents)."""
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(connection_string) as service:
            for container in service.list_containers():
                client = service.get_container_client(container.name)
                for blob in client.list_blobs():
                    data = client.download_blob(blob.name).readall()
                    self.bytes(f"blob {container.name}/{blob.name}", data, kind="blob")


def _events(http: httpx.Client) -> Iterator[dict[str, Any]]:
    """Every stored event, following the API's page tokens (events/filter answers at most 50 per page)."""
    response = http.post(
        "/events/filter", json={"limit": 50, "filter": {"occurred": {"since": "2000-01-01T00:00:00Z"}}}
    )
    while True:
        response.raise_for_status()
        page = response.json()
        yield from page["events"]
        if not page.get("next_page"):
            return
        response = http.get(page["next_page"])


def _paged(http: httpx.Client, collection: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    offset = 0
    while True:
        response = http.post(f"/{collection}/filter", json={**body, "limit": PAGE, "offset": offset})
        response.raise_for_status()
        items = response.json()
        if isinstance(items, dict):  # some collections answer {"results": [...]} (paginated endpoints)
            items = items.get("results", [])
        yield from items
        if len(items) < PAGE:
            return
        offset += PAGE
