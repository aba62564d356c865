"""The tollwatch event contract: one source of truth for names, resources, payloads and ids.

Every producer (Azure Function, CLI, flow) and every consumer (automations, subscriptions, tests) goes
through these models, so a renamed field or event breaks loudly here instead of silently in a trigger.

Ids are deterministic wherever a retry could re-send the same fact (the same publish seen twice, the same
backfill chunk requested twice, the same load reported twice): Prefect drops events whose id it has already
seen, which turns at-least-once delivery into exactly-once effect.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Namespace for every deterministic id tollwatch derives. Never change it: ids would stop deduplicating.
TOLLWATCH_NAMESPACE = uuid.UUID("5b0f3c1e-7d1a-4c5e-9a51-3f2f4f6b9d10")

#: The first day of the upstream dataset (MTA B&T hourly traffic begins 2010-01-01).
DATASET_EPOCH = date(2010, 1, 1)


class EventName(StrEnum):
    """All event names tollwatch emits or reacts to."""

    DATASET_REFRESHED = "tollwatch.dataset.refreshed"
    BACKFILL_REQUESTED = "tollwatch.backfill.requested"
    INGESTION_COMPLETED = "tollwatch.ingestion.completed"
    INGESTION_FAILED = "tollwatch.ingestion.failed"
    INGESTION_HELD = "tollwatch.ingestion.held"
    INGESTION_PUBLISHED = "tollwatch.ingestion.published"
    INGESTION_DISCARDED = "tollwatch.ingestion.discarded"
    JOB_COMPLETED = "tollwatch.job.completed"
    JOB_FAILED = "tollwatch.job.failed"


def deterministic_id(*parts: object) -> uuid.UUID:
    """A uuid5 over the given parts: the same fact always gets the same event id."""
    return uuid.uuid5(TOLLWATCH_NAMESPACE, "|".join(str(p) for p in parts))


# --------------------------------------------------------------------------------------------- resources


def dataset_resource_id(domain: str, dataset_id: str) -> str:
    """`socrata.<domain>.<dataset-id>`: the upstream dataset as a Prefect resource."""
    return f"socrata.{domain}.{dataset_id}"


def table_resource_id(catalog: str, table: str) -> str:
    """`iceberg.<catalog>.<namespace>.<table>`: the Iceberg table as a Prefect resource."""
    return f"iceberg.{catalog}.{table}"


#: Payload fields of the ingestion events that are copied onto the event's resource as labels, so a trigger
#: (which can only match resource labels) can select on them: subscription `when:` conditions use these keys.
INGESTION_LABELS: dict[str, str] = {
    "table": "tollwatch.table",
    "mode": "tollwatch.mode",
    "already_committed": "tollwatch.already-committed",
    "quality": "tollwatch.quality",
}

#: What a load's audit concluded, as its events say it (`quality.verdict`, and the `tollwatch.quality` label):
#: `passed`; `warned` (published with a failing `warn` check); `overridden` (held, then published by an operator);
#: `held` (not published); `unaudited` (committed before write-audit-publish, or merged where the flow cannot read
#: the table, see README).
QualityVerdict = Literal["passed", "warned", "overridden", "held", "unaudited"]
#: Labels whose value is not the payload field itself: what a `when:` condition on them is validated against.
LABEL_VALUE_TYPES: dict[str, Any] = {"quality": QualityVerdict}

#: The label every event about one load carries on its resource (requested, refreshed, completed, failed): a
#: proactive trigger pairs "announced" with "completed" per load by it (`for_each`), which is how a load that
#: never completed is noticed (automations/repair-*.yaml).
REFRESH_ID_LABEL = "tollwatch.refresh-id"


def label_value(value: object) -> str:
    """How a payload value is written as a label: booleans lower-case (`true`/`false`), the rest as text."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def ingestion_labels(payload: BaseModel) -> tuple[tuple[str, str], ...]:
    """The INGESTION_LABELS of one ingestion payload, plus its refresh id, as resource labels."""
    labels = tuple(
        (label, label_value(getattr(payload, field)))
        for field, label in INGESTION_LABELS.items()
        if getattr(payload, field, None) is not None
    )
    refresh_id = getattr(payload, "refresh_id", None)
    return (*labels, (REFRESH_ID_LABEL, refresh_id)) if refresh_id else labels


def job_resource_id(job: str | int, *, databricks: bool) -> str:
    """`databricks.job.<id>` or `local.job.<name>`: a downstream job as a Prefect resource."""
    return f"databricks.job.{job}" if databricks else f"local.job.{job}"


class Resource(BaseModel):
    """A Prefect resource reference (`prefect.resource.id` plus optional name/role)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None = None
    role: str | None = None
    labels: tuple[tuple[str, str], ...] = Field(
        default=(), description="extra labels automations can match on (Prefect triggers match labels, not payloads)"
    )

    def to_prefect(self) -> dict[str, str]:
        """The label dict Prefect expects."""
        labels = {"prefect.resource.id": self.id}
        if self.name:
            labels["prefect.resource.name"] = self.name
        if self.role:
            labels["prefect.resource.role"] = self.role
        labels.update(self.labels)
        return labels


def flow_run_resource(flow_run_id: str | uuid.UUID, name: str | None = None) -> Resource:
    """The related resource Prefect itself uses for a flow run, so the UI links events to runs."""
    return Resource(id=f"prefect.flow-run.{flow_run_id}", name=name, role="flow-run")


def deployment_resource(deployment_id: str | uuid.UUID, name: str | None = None) -> Resource:
    """The related resource Prefect itself uses for a deployment."""
    return Resource(id=f"prefect.deployment.{deployment_id}", name=name, role="deployment")


# --------------------------------------------------------------------------------------------- payloads


class Window(BaseModel):
    """A half-open range of days `[start, stop)`; `stop` is exclusive, as everywhere in tollwatch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: date
    stop: date

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be after start ({self.start}); stop is exclusive")
        return self

    @property
    def days(self) -> int:
        """Number of days covered."""
        return (self.stop - self.start).days

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})"


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlobRef(_Payload):
    """The blob whose creation announced a publish (Event Grid `Microsoft.Storage.BlobCreated`)."""

    url: str
    etag: str
    sequencer: str = Field(description="Event Grid's per-blob ordering key; string comparison orders events")


class DatasetRefreshed(_Payload):
    """The upstream dataset was republished (its `rowsUpdatedAt` moved, or a blob announcing it was written)."""

    domain: str
    dataset_id: str
    rows_updated_at: int = Field(description="Socrata rowsUpdatedAt, epoch seconds")
    previous_rows_updated_at: int | None = Field(
        default=None, description="the watermark before this refresh; None = first sighting"
    )
    window: Window | None = Field(default=None, description="days touched, when the producer knows them")
    source: str = Field(default="watcher", description="what noticed the publish: watcher, eventgrid, cli")
    blob: BlobRef | None = Field(
        default=None, description="Event Grid only: the blob whose creation announced this publish"
    )

    @property
    def refresh_id(self) -> str:
        """Identity of this publish: the same (dataset, rowsUpdatedAt) is the same refresh."""
        return str(deterministic_id("refresh", self.domain, self.dataset_id, self.rows_updated_at))

    def event_id(self) -> uuid.UUID:
        """Same publish seen twice (two watchers, Event Grid redelivery) → same event id.

        A blob-announced publish is identified by the dataset plus the blob's URL and eTag: Event Grid
        redelivers the very same blob version with the same pair, while a rewrite of the blob gets a new eTag
        and so is a new refresh.
        """
        if self.blob is not None:
            blob = self.blob
            return deterministic_id(
                "event", EventName.DATASET_REFRESHED, "blob", self.domain, self.dataset_id, blob.url, blob.etag
            )
        return deterministic_id("event", EventName.DATASET_REFRESHED, self.refresh_id)

    def resource(self) -> Resource:
        return Resource(
            id=dataset_resource_id(self.domain, self.dataset_id),
            role="dataset",
            labels=((REFRESH_ID_LABEL, self.refresh_id),),
        )


class BackfillRequested(_Payload):
    """Someone asked for a window to be (re)loaded."""

    domain: str
    dataset_id: str
    start: date
    stop: date
    request_id: str = Field(description="groups the chunks of one request; a --rerun makes a new one")
    requested_by: str = "unknown"
    reason: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        Window(start=self.start, stop=self.stop)
        return self

    @property
    def window(self) -> Window:
        return Window(start=self.start, stop=self.stop)

    @property
    def refresh_id(self) -> str:
        """Identity of this load: the window plus the request it belongs to."""
        return str(deterministic_id("backfill", self.domain, self.dataset_id, self.start, self.stop, self.request_id))

    def event_id(self) -> uuid.UUID:
        return deterministic_id("event", EventName.BACKFILL_REQUESTED, self.refresh_id)

    def resource(self) -> Resource:
        return Resource(
            id=dataset_resource_id(self.domain, self.dataset_id),
            role="dataset",
            labels=((REFRESH_ID_LABEL, self.refresh_id),),
        )


class QualityOutcome(_Payload):
    """The audit of a load as its events carry it: the verdict, each check's outcome, and any override."""

    verdict: QualityVerdict
    checks: list[dict[str, Any]] = Field(default_factory=list, description="name, severity, passed, value, …")
    warnings: list[str] = Field(default_factory=list, description="failing `warn` checks (published anyway)")
    failing: list[str] = Field(default_factory=list, description="failing `error` checks (why it was held)")
    overridden_by: str | None = None
    override_reason: str | None = None

    def __str__(self) -> str:
        """The label value (`tollwatch.quality`): the verdict."""
        return self.verdict


class Durations(_Payload):
    """Wall-clock seconds per stage of an ingest run."""

    fetch_s: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0


class IngestionCompleted(_Payload):
    """A load committed (or was found already committed) to the table."""

    table: str
    catalog: str
    mode: Literal["refresh", "window"]
    window: Window | None
    refresh_id: str
    rows_fetched: int
    rows_written: int
    rows_rejected: int
    snapshot_id: int | None
    landing_uri: str
    already_committed: bool = Field(default=False, description="True when this refresh was a no-op replay")
    flow_run_id: str | None = None
    durations: Durations = Durations()
    run_page_url: str | None = Field(default=None, description="the Databricks run that merged, when one did")
    engine: Literal["local", "spark", "databricks"] = Field(
        default="local", description="what merged the load: pyiceberg in the flow, spark-submit, or Databricks"
    )
    committed_through: int | None = Field(
        default=None, description="the ledger's mark after this load: every version published through it is in"
    )
    upstream_rows: int | None = Field(
        default=None, description="after the commit: the upstream's row count for the days this load touched"
    )
    table_rows: int | None = Field(default=None, description="after the commit: the table's rows for those days")
    quality: QualityOutcome | None = Field(default=None, description="what the audit of this load found")

    def event_id(self) -> uuid.UUID:
        """One completion per refresh: a retried emit or a replayed run cannot announce it twice."""
        return deterministic_id("event", EventName.INGESTION_COMPLETED, self.refresh_id)

    def resource(self) -> Resource:
        return Resource(id=table_resource_id(self.catalog, self.table), role="table", labels=ingestion_labels(self))


class IngestionFailed(_Payload):
    """An ingest run failed; the table was not changed by it."""

    table: str
    catalog: str
    mode: Literal["refresh", "window"]
    window: Window | None
    refresh_id: str | None
    error_class: str
    error_message: str
    flow_run_id: str | None = None

    def event_id(self) -> uuid.UUID:
        """One failure per flow run (a random id when the run is unknown: every failure is news)."""
        if self.flow_run_id:
            return deterministic_id("event", EventName.INGESTION_FAILED, self.flow_run_id)
        return uuid.uuid4()

    def resource(self) -> Resource:
        return Resource(id=table_resource_id(self.catalog, self.table), role="table", labels=ingestion_labels(self))


class IngestionHeld(_Payload):
    """A load failed an `error` check: it stays on its audit branch, `main` and subscribers are untouched."""

    table: str
    catalog: str
    mode: Literal["refresh", "window"]
    window: Window | None
    refresh_id: str
    branch: str = Field(description="the audit branch holding the load")
    snapshot_id: int = Field(description="the branch's head: the load as it was audited")
    quality: QualityOutcome
    flow_run_id: str | None = None

    def event_id(self) -> uuid.UUID:
        """One hold per refresh: a replayed run that finds the load still held repeats the same event."""
        return deterministic_id("event", EventName.INGESTION_HELD, self.refresh_id)

    def resource(self) -> Resource:
        return Resource(id=table_resource_id(self.catalog, self.table), role="table", labels=ingestion_labels(self))


class LoadSettled(_Payload):
    """An operator settled a held load: published it (an override) or discarded it."""

    table: str
    catalog: str
    refresh_id: str
    action: Literal["published", "discarded"]
    by: str
    reason: str
    snapshot_id: int | None = None

    @property
    def name(self) -> EventName:
        return EventName.INGESTION_PUBLISHED if self.action == "published" else EventName.INGESTION_DISCARDED

    def event_id(self) -> uuid.UUID:
        """One settlement per refresh: repeating the command repeats the same event."""
        return deterministic_id("event", self.name, self.refresh_id)

    def resource(self) -> Resource:
        return Resource(id=table_resource_id(self.catalog, self.table), role="table", labels=ingestion_labels(self))


class JobFinished(_Payload):
    """A downstream job ended (the event name says how)."""

    job: str
    databricks: bool = False
    succeeded: bool
    run_id: str | None = None
    run_page_url: str | None = None
    upstream_snapshot_id: int | None = None
    upstream_refresh_id: str | None = None
    error_message: str | None = None
    flow_run_id: str | None = None

    @property
    def name(self) -> EventName:
        return EventName.JOB_COMPLETED if self.succeeded else EventName.JOB_FAILED

    def event_id(self) -> uuid.UUID:
        return deterministic_id("event", self.name, self.job, self.upstream_refresh_id, self.flow_run_id)

    def resource(self) -> Resource:
        return Resource(id=job_resource_id(self.job, databricks=self.databricks), role="job")


# --------------------------------------------------------------------------------------------- envelope

AnyPayload = (
    DatasetRefreshed
    | BackfillRequested
    | IngestionCompleted
    | IngestionFailed
    | IngestionHeld
    | LoadSettled
    | JobFinished
)

_NAMES: dict[type[BaseModel], EventName] = {
    DatasetRefreshed: EventName.DATASET_REFRESHED,
    BackfillRequested: EventName.BACKFILL_REQUESTED,
    IngestionCompleted: EventName.INGESTION_COMPLETED,
    IngestionFailed: EventName.INGESTION_FAILED,
    IngestionHeld: EventName.INGESTION_HELD,
}


class TollwatchEvent(BaseModel):
    """An event ready to send: what the Prefect events API (`POST /api/events`) accepts."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    event: EventName
    occurred: datetime
    resource: Resource
    related: tuple[Resource, ...] = ()
    payload: dict[str, Any]

    @classmethod
    def of(
        cls, payload: AnyPayload, *, related: tuple[Resource, ...] = (), occurred: datetime | None = None
    ) -> TollwatchEvent:
        """Wrap a payload model in its envelope with its deterministic id and resource."""
        name = payload.name if isinstance(payload, JobFinished | LoadSettled) else _NAMES[type(payload)]
        return cls(
            id=payload.event_id(),
            event=name,
            occurred=occurred or datetime.now(UTC),
            resource=payload.resource(),
            related=related,
            payload=payload.model_dump(mode="json"),
        )

    def to_prefect(self) -> dict[str, Any]:
        """The JSON body of one event for `POST /api/events` (Prefect's `Event` schema)."""
        return {
            "id": str(self.id),
            "event": str(self.event),
            "occurred": self.occurred.isoformat(),
            "resource": self.resource.to_prefect(),
            "related": [r.to_prefect() for r in self.related],
            "payload": self.payload,
        }
