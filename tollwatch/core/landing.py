"""The landing zone: raw upstream pages in Azure Blob Storage, exactly as received, gzip-compressed.

Landed files are what the table load reads, so any load can be replayed from them, and the raw bytes are
the evidence when a number looks wrong. A landing is complete only when its `manifest.json` exists: the
manifest is written last, so a run killed mid-landing leaves no manifest and is never loaded half.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime

import orjson
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import ContainerClient, ContentSettings
from pydantic import BaseModel, Field

from tollwatch.adapters.socrata import Page
from tollwatch.contract.events import Window
from tollwatch.contract.table import UPSTREAM_DAYS

log = logging.getLogger(__name__)

_GZIP = ContentSettings(content_type="application/gzip")
_JSON = ContentSettings(content_type="application/json")


class LandedPage(BaseModel):
    """One landed page: its blob name and row count."""

    blob: str
    rows: int
    bytes_raw: int
    bytes_stored: int


class LandingManifest(BaseModel):
    """Everything needed to replay a load: where the pages are, what was asked, what came back."""

    dataset: str
    mode: str
    refresh_id: str
    run_id: str
    window: Window | None
    where: str | None
    container: str
    prefix: str
    after: int | None = Field(
        default=None, description="refresh: the ledger's mark it fetched from (exclusive); None = every version"
    )
    through: int | None = Field(
        default=None, description="the fetch's ceiling: versions published at or before this rowsUpdatedAt"
    )
    upstream_rows: int | None = Field(default=None, description="the upstream's count(*) for `where`, reconciled")
    pages: list[LandedPage] = Field(default_factory=list)
    columns: list[str] = Field(default_factory=list)
    landed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pages)


class LandingZone:
    """Writes and reads landings in one container. Built from settings by `tollwatch.resources`."""

    def __init__(self, container: ContainerClient, *, compress_level: int = 6) -> None:
        self._container = container
        self._level = compress_level

    @property
    def container_name(self) -> str:
        return self._container.container_name

    def uri(self, prefix: str) -> str:
        """A URL for a landing prefix (what events and logs show)."""
        return f"{self._container.url.rstrip('/')}/{prefix.strip('/')}/"

    def ensure_container(self) -> None:
        """Create the container on first use (Azurite starts empty)."""
        try:
            self._container.create_container()
            log.info("created blob container %s", self.container_name)
        except ResourceExistsError:
            pass

    @staticmethod
    def refresh_prefix(dataset: str, mode: str, window: Window | None, refresh_id: str) -> str:
        """`raw/<dataset>/<window or refresh>/refresh=<id>`: where every run of one refresh lands."""
        scope = f"window={window.start}_{window.stop}" if window else f"mode={mode}"
        return f"raw/{dataset}/{scope}/refresh={refresh_id}"

    @classmethod
    def prefix_for(cls, dataset: str, mode: str, window: Window | None, refresh_id: str, run_id: str) -> str:
        """`raw/<dataset>/<window or refresh>/refresh=<id>/run=<run>`: deterministic per dataset/window/refresh/run."""
        return f"{cls.refresh_prefix(dataset, mode, window, refresh_id)}/run={run_id}"

    def put_page(self, prefix: str, page: Page) -> LandedPage:
        """Land one page verbatim (gzip)."""
        name = f"{prefix}/page-{page.number:05d}.json.gz"
        data = gzip.compress(page.body, compresslevel=self._level)
        self._container.upload_blob(name, data, overwrite=True, content_settings=_GZIP)
        return LandedPage(blob=name, rows=page.row_count, bytes_raw=len(page.body), bytes_stored=len(data))

    def put_rejected(self, prefix: str, page_number: int, rejected: list[dict[str, object]]) -> str:
        """Quarantine rows that failed validation, one JSON line each with its reason."""
        name = f"{prefix.replace('raw/', 'rejected/', 1)}/page-{page_number:05d}.ndjson.gz"
        lines = b"\n".join(orjson.dumps(r) for r in rejected) + b"\n"
        self._container.upload_blob(
            name, gzip.compress(lines, compresslevel=self._level), overwrite=True, content_settings=_GZIP
        )
        return name

    def put_manifest(self, manifest: LandingManifest) -> str:
        """Seal a landing: written last, so its presence means every page is there."""
        name = f"{manifest.prefix}/manifest.json"
        self._container.upload_blob(
            name, manifest.model_dump_json(indent=2).encode(), overwrite=True, content_settings=_JSON
        )
        return name

    def put_upstream_days(self, prefix: str, counts: dict[date, int]) -> str:
        """The upstream's rows per day of a load, beside its manifest: what an audit on the cluster reconciles."""
        name = f"{prefix}/{UPSTREAM_DAYS}"
        body = orjson.dumps({day.isoformat(): n for day, n in sorted(counts.items())})
        self._container.upload_blob(name, body, overwrite=True, content_settings=_JSON)
        return name

    def mark_announced(self, refresh_prefix: str, event_id: str, snapshot_id: int | None) -> str:
        """Record that this refresh's completion was announced (written after the announcement succeeded).

        The snapshot ledger says a refresh was committed; this says subscribers were told. A run killed between
        the two leaves no marker, so its re-run announces the committed load as news instead of as a replay.
        """
        name = f"{refresh_prefix.rstrip('/')}/announced.json"
        body = {"event_id": event_id, "snapshot_id": snapshot_id, "announced_at": datetime.now(UTC).isoformat()}
        self._container.upload_blob(name, orjson.dumps(body), overwrite=True, content_settings=_JSON)
        return name

    def is_announced(self, refresh_prefix: str) -> bool:
        """Whether some run announced this refresh's completion (see `mark_announced`)."""
        return self._container.get_blob_client(f"{refresh_prefix.rstrip('/')}/announced.json").exists()

    def read_manifest(self, prefix: str) -> LandingManifest:
        """The manifest of a sealed landing; a clear error when the landing is incomplete."""
        try:
            data = self._container.download_blob(f"{prefix.rstrip('/')}/manifest.json").readall()
        except ResourceNotFoundError as exc:
            raise FileNotFoundError(f"no sealed landing at {self.uri(prefix)} (manifest.json missing)") from exc
        return LandingManifest.model_validate_json(data)

    def read_page(self, page: LandedPage) -> bytes:
        """One landed page, decompressed (one page in memory at a time)."""
        return gzip.decompress(self._container.download_blob(page.blob).readall())

    def iter_pages(self, manifest: LandingManifest) -> Iterator[tuple[int, bytes]]:
        """(page number, raw JSON bytes) for every page of a landing, in order."""
        for number, page in enumerate(manifest.pages):
            yield number, self.read_page(page)

    def list_blobs(self, prefix: str) -> list[str]:
        """Blob names under a prefix (for status, tests and clean-up)."""
        return [b.name for b in self._container.list_blobs(name_starts_with=prefix)]
