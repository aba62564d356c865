"""The narrow interfaces the core calls, each only as wide as the core's calls into it.

The core's functions take these, not the concrete clients, so what they decide can be checked against in-memory
stand-ins (tests/support/fakes.py; never in the product), while `tollwatch.resources` builds the real ones: the
Socrata client (`tollwatch.adapters.socrata.SocrataClient`), the landing zone in Blob Storage
(`tollwatch.core.landing.LandingZone`), the Iceberg table (`tollwatch.core.table.IcebergTableStore`), JSON state
blobs (`tollwatch.adapters.blob_state.JsonBlobStore`) and the event emitters (`tollwatch.adapters.prefect_events`).

| port | used by | real implementation |
|---|---|---|
| `EventSink` | watcher, Event Grid receiver, backfill/audit callers | `PrefectEventsEmitter`, `WebhookEmitter` |
| `UpstreamMetadata` | watcher, `plan_fetch` | `SocrataClient` |
| `UpstreamRows` | `fetch_and_land` | `SocrataClient` |
| `UpstreamCounts` | auto backfill plans, audit | `SocrataClient` |
| `Landing` | `fetch_and_land`, `load_landing`, `previous_load` | `LandingZone` |
| `TableStore` | `plan_fetch`'s caller, `load_landing`, `previous_load`, `covered_load` | `IcebergTableStore` |
| `JsonState` | `WatermarkStore`, `SequencerStore` | `JsonBlobStore` |

The audit's table side (`tollwatch.core.audit.table_counts_by_day`) scans the pyiceberg table itself and keeps the
concrete `IcebergTableStore`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel

from tollwatch.adapters.prefect_events import EventSink

if TYPE_CHECKING:
    import pyarrow as pa

    from tollwatch.adapters.blob_state import Versioned
    from tollwatch.adapters.socrata import DatasetMetadata, Page
    from tollwatch.contract.events import Window
    from tollwatch.core.landing import LandedPage, LandingManifest
    from tollwatch.core.table import CommittedLoad, TableInfo

__all__ = [
    "EventSink",
    "JsonState",
    "Landing",
    "TableStore",
    "UpstreamCounts",
    "UpstreamMetadata",
    "UpstreamRows",
]

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------- the upstream


class UpstreamMetadata(Protocol):
    """The dataset's metadata: its `rows_updated_at` is the publish watermark."""

    def metadata(self, dataset_id: str) -> DatasetMetadata: ...


class UpstreamRows(Protocol):
    """The rows matching a `$where`, page by page in stable order, and how many there are (what a load reconciles)."""

    def pages(self, dataset_id: str, *, where: str | None, page_size: int) -> Iterator[Page]: ...

    def count(self, dataset_id: str, *, where: str | None) -> int: ...


class UpstreamCounts(Protocol):
    """Rows per day matching a `$where` (days without rows absent)."""

    def counts_by_day(self, dataset_id: str, *, where: str | None) -> dict[date, int]: ...


# ---------------------------------------------------------------------------------------------- the landing zone


class Landing(Protocol):
    """Raw pages of one load, their seal (the manifest), quarantined rows and the announcement marker."""

    @property
    def container_name(self) -> str: ...

    def ensure_container(self) -> None: ...

    def prefix_for(self, dataset: str, mode: str, window: Window | None, refresh_id: str, run_id: str) -> str: ...

    def uri(self, prefix: str) -> str: ...

    def put_page(self, prefix: str, page: Page) -> LandedPage: ...

    def put_manifest(self, manifest: LandingManifest) -> str: ...

    def iter_pages(self, manifest: LandingManifest) -> Iterator[tuple[int, bytes]]: ...

    def put_rejected(self, prefix: str, page_number: int, rejected: list[dict[str, object]]) -> str: ...

    def is_announced(self, refresh_prefix: str) -> bool: ...


# ---------------------------------------------------------------------------------------------- the table


class TableStore(Protocol):
    """The table's ledger (what was committed, by which refresh, through which upstream version) and its two commits.

    `months` are `(YYYY-MM, rows)` pairs; a commit consumes them and returns the snapshot id recording `properties`.
    """

    def info(self) -> TableInfo: ...

    def committed(self, refresh_id: str) -> int | None: ...

    def committed_load(self, refresh_id: str, ref: str = ...) -> CommittedLoad | None: ...

    def committed_through(self, table: Any = None, ref: str = ...) -> int | None: ...

    def commit_window(
        self,
        window: Window,
        months: Iterable[tuple[str, pa.Table]],
        schema: pa.Schema,
        properties: dict[str, str],
        *,
        fetched_through: int,
        branch: str = ...,
    ) -> int: ...

    def commit_merge(
        self,
        months: Iterable[tuple[str, pa.Table]],
        schema: pa.Schema,
        properties: dict[str, str],
        *,
        through: int,
        branch: str = ...,
    ) -> int: ...


# ---------------------------------------------------------------------------------------------- state


class JsonState(Protocol):
    """Small JSON documents read with a version (ETag) and written only if still at that version."""

    def read(self, name: str, model: type[M]) -> Versioned[M]: ...

    def write(self, name: str, value: BaseModel, *, expected_etag: str | None) -> bool: ...
