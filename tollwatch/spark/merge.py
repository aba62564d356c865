"""`tollwatch-merge`: merge one sealed landing into the bronze Iceberg table with Spark (the wheel's entry point).

On Databricks it is a `python_wheel_task` (package `tollwatch`, entry point `tollwatch-merge`); on any other Spark
(`TOLLWATCH_ENGINE=spark`) `spark-submit` runs this file. Either way:

    tollwatch-merge --landing <abfss://…|https://…|path> --table tollwatch.bronze.bnt_traffic_hourly \\
        --mode window --start 2024-01-01 --stop 2024-02-01 --refresh-id <id> [--flow-run-id <id>]

1. Ledger: a refresh id already committed is a no-op (a retried or redelivered load must not apply twice).
2. Read the sealed landing (its manifest is written last, so an unsealed landing is refused) as strings.
3. Type and check every row by the table contract; a failing row is counted under its first reason.
4. Dedupe on the natural key: the newest version, then the latest row (page order, position in the page).
5. One atomic commit: the load's months rewritten with, per key, the newer of the stored and loaded versions
   (versions only move forward); a window also drops stored rows of its days that the upstream deleted. Every
   snapshot carries the contract's ledger properties: refresh id, mode, window, flow run, touched days and the
   high-water mark. A concurrent commit to the same months makes the load re-read and commit again.
6. Print one `TOLLWATCH_RESULT=<json>` line (the flow reads it from the driver output) and return the same dict.

What differs from the local writer, on purpose: rejected rows are counted, not quarantined to blob storage (the
landing keeps them raw), and the per-day reconciliation after the commit is the flow's, not the job's.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window as W

from tollwatch.contract import table as contract
from tollwatch.contract.result import MergeResult
from tollwatch.spark.entry import log_to_driver, print_result
from tollwatch.spark.iceberg import IcebergTable, conform, months_between, retry_conflicts
from tollwatch.spark.landing import read_manifest, read_pages, readable
from tollwatch.spark.rows import REASON, dedupe_on_key, rejected_by_reason, spark_schema, type_rows

if TYPE_CHECKING:  # the audit needs pydantic and pyarrow: imported only by `--audit` (a plain merge runs without)
    from tollwatch.contract.quality import HoldRecord, QualitySpec

log = logging.getLogger("tollwatch.spark")


@dataclass(frozen=True)
class Args:
    """What to merge, where, and how (the task's parameters)."""

    landing: str
    table: str
    mode: str
    refresh_id: str
    start: date | None
    stop: date | None
    flow_run_id: str | None
    #: The load's audit branch (the flow cut it from `main` and publishes it after the audit); `main` writes directly.
    branch: str = contract.MAIN
    #: Write-audit-publish on the cluster (`tollwatch.spark.audit`): branch, audit and publish here, not in the flow.
    audit: bool = False
    #: The checks' YAML on the cluster (a /Volumes/ or dbfs: path); unset: the defaults shipped in the wheel.
    quality_spec: str | None = None

    @property
    def window(self) -> tuple[date, date] | None:
        return (self.start, self.stop) if self.start and self.stop else None

    def properties(self) -> dict[str, str]:
        return contract.load_properties(self.refresh_id, self.mode, self.window, self.flow_run_id)


def _optional_date(text: str) -> date | None:
    """An ISO date; empty means not given (a job parameter a run does not set arrives as `--start=`)."""
    return date.fromisoformat(text) if text.strip() else None


def parse_args(argv: Sequence[str]) -> Args:
    """Parse and check the arguments; a bad combination fails before Spark does any work."""
    parser = argparse.ArgumentParser(prog="tollwatch-merge", description="Merge one tollwatch landing with Spark.")
    parser.add_argument("--landing", required=True, help="directory of the landed pages (abfss://, https://, path)")
    parser.add_argument("--table", required=True, help="catalog.namespace.table")
    parser.add_argument("--mode", choices=("window", "refresh"), required=True)
    parser.add_argument("--start", type=_optional_date, help="first day of the window (ISO date)")
    parser.add_argument("--stop", type=_optional_date, help="day after the window (exclusive)")
    parser.add_argument("--refresh-id", required=True)
    parser.add_argument("--flow-run-id", help="the Prefect flow run the load belongs to")
    parser.add_argument("--branch", default=contract.MAIN, help="the audit branch to commit to (default: main)")
    parser.add_argument(
        "--audit",
        nargs="?",
        const="yes",
        default="no",
        type=str.lower,
        choices=("yes", "no", ""),  # "": a job parameter a run left empty (as `--start=`): not audited
        help="write-audit-publish here: commit to the load's audit branch, run the checks, publish only on pass",
    )
    parser.add_argument("--quality-spec", help="the checks' YAML (default: the wheel's contract/quality.yaml)")
    ns = parser.parse_args(list(argv))
    if (ns.start is None) != (ns.stop is None):
        parser.error("--start and --stop go together")
    if ns.start is not None and ns.stop <= ns.start:
        parser.error(f"--stop ({ns.stop}) must be after --start ({ns.start}); stop is exclusive")
    if ns.mode == "window" and ns.start is None:
        parser.error("--mode window needs --start and --stop")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}", ns.table):
        parser.error(f"--table {ns.table!r} is not a [catalog.]namespace.table name")
    if not ns.refresh_id.strip():
        parser.error("--refresh-id must not be empty")
    if not re.fullmatch(r"[A-Za-z_]\w*", ns.branch or ""):
        parser.error(f"--branch {ns.branch!r} is not a branch name of letters, digits and _")
    if ns.audit == "yes" and ns.branch != contract.MAIN:
        parser.error("--audit names its own branch (audit_<refresh id>): do not give --branch with it")
    return Args(
        ns.landing,
        ns.table,
        ns.mode,
        ns.refresh_id,
        ns.start,
        ns.stop,
        ns.flow_run_id or None,
        ns.branch,
        audit=ns.audit == "yes",
        quality_spec=ns.quality_spec or None,
    )


def merged(
    existing: DataFrame, new: DataFrame, mode: str, window: tuple[date, date] | None, through: int | None
) -> DataFrame:
    """The new content of the rewritten months; versions only move forward (as `tollwatch.core.table.newest_per_key`).

    Per key, the stored and the loaded row compete by version (the loaded one wins a tie). Window: the months' rows
    outside the window stay; a stored row of the window the load lacks was deleted upstream when it is no newer than
    the fetch (`through`) and goes, a newer one stays. Refresh: stored rows the load lacks stay.
    """
    keys = new.select(*contract.KEY)
    if mode == "window" and window:
        day = F.col(contract.PARTITION.source)
        inside = (day >= F.lit(window[0])) & (day < F.lit(window[1]))
        stored, kept = existing.where(inside), existing.where(~inside)
        present = stored.join(keys, on=list(contract.KEY), how="left_semi")
        absent = stored.join(keys, on=list(contract.KEY), how="left_anti")
        if through is None:
            absent = absent.limit(0)
        else:
            absent = absent.where(F.col(contract.VERSION) >= F.lit(datetime.fromtimestamp(through + 1, UTC)))
        competing = present.unionByName(absent)
    else:
        competing = existing.join(keys, on=list(contract.KEY), how="left_semi")
        kept = existing.join(keys, on=list(contract.KEY), how="left_anti")
    both = competing.withColumn("__incoming", F.lit(0)).unionByName(new.withColumn("__incoming", F.lit(1)))
    newest = W.partitionBy(*contract.KEY).orderBy(F.col(contract.VERSION).desc_nulls_last(), F.col("__incoming").desc())
    winners = both.withColumn("__rank", F.row_number().over(newest)).where(F.col("__rank") == 1)
    return kept.unionByName(winners.drop("__rank", "__incoming"))


@contextmanager
def cached(df: DataFrame) -> Iterator[DataFrame]:
    """Cache a frame several steps read (counts, months, write) so the pages are parsed once; Databricks serverless
    refuses caching, and there the frame is recomputed (the page scan is deterministic, so the rows are the same)."""
    try:
        persisted = df.persist()
    except Exception as exc:  # serverless: NOT_SUPPORTED_WITH_SERVERLESS and the like
        log.info("cannot cache (%s); recomputing instead", exc.__class__.__name__)
        yield df
        return
    try:
        yield persisted
    finally:
        persisted.unpersist()


def _touched(new: DataFrame, args: Args) -> tuple[date, date] | None:
    """A window touches its days (even emptied ones); a refresh the days of its rows."""
    if args.mode == "window" and args.window:
        return args.window
    bounds = new.agg(F.min("date").alias("lo"), F.max("date").alias("hi")).first()
    if bounds is None or bounds["lo"] is None:
        return None
    return bounds["lo"], date.fromordinal(bounds["hi"].toordinal() + 1)


def load(spark: SparkSession, args: Args) -> MergeResult:
    """Ledger check, then read, type, dedupe and commit: the whole merge of one landing."""
    result = MergeResult(args.table, args.mode, args.refresh_id, args.properties().get(contract.WINDOW))
    table = IcebergTable(spark, args.table, args.branch)
    previous = table.committed(args.refresh_id)
    if previous is not None:
        # on main: a replay; on its audit branch: a load a crashed run left unpublished (news once published)
        result.already_committed, result.snapshot_id = args.branch == contract.MAIN, previous.snapshot_id
        result.touched = contract.encode_days(*previous.touched) if previous.touched else None
        result.committed_through = table.committed_through()
        log.info("refresh %s already committed in %s@%s: nothing to do", args.refresh_id, args.table, args.branch)
        return result
    with readable(args.landing) as landing:
        manifest = read_manifest(spark, landing)
        log.info("landing %s: %d pages, %d rows", args.landing, len(manifest.pages), manifest.rows)
        columns = contract.target_columns(manifest.columns)
        pages = read_pages(spark, landing, manifest, columns)
        with cached(type_rows(pages, columns, args.window)) as typed:
            result.rows_read, result.rejected_by_reason = rejected_by_reason(typed)
            result.rows_rejected = sum(result.rejected_by_reason.values())
            with cached(dedupe_on_key(typed.where(F.col(REASON).isNull()).drop(REASON))) as new:
                result.rows_written = new.count()
                commit(table, new, columns, args, result, manifest.through)
    log.info("wrote %d rows into %s (%d rejected)", result.rows_written, args.table, result.rows_rejected)
    return result


def commit(
    table: IcebergTable,
    new: DataFrame,
    columns: tuple[contract.Column, ...],
    args: Args,
    result: MergeResult,
    through: int | None,
) -> None:
    """Create or evolve the table, then one commit carrying the ledger (retried after a concurrent commit)."""
    schema = table.ensure(spark_schema(columns))
    table.ensure_branch()  # the flow cut it already (local engines); on Databricks this cuts it
    touched = _touched(new, args)
    if args.mode == "window" and args.window:
        months = months_between(*args.window)
    else:
        found = new.select(F.trunc("date", "month").alias("m")).distinct().collect()
        months = sorted(r["m"] for r in found)

    def attempt() -> None:
        properties = args.properties()
        if touched:
            properties[contract.TOUCHED] = contract.encode_days(*touched)
        # the mark this commit records: the table's current one, raised to the fetch's ceiling by a refresh;
        # recomputed on every attempt, so a retry after a concurrent commit never records one already passed
        marks = [m for m in (table.committed_through(), through if args.mode == "refresh" else None) if m is not None]
        if marks:
            properties[contract.COMMITTED_THROUGH] = str(max(marks))
        incoming = conform(new, schema)
        if months:

            def content(existing: DataFrame) -> DataFrame:
                return merged(conform(existing, schema), incoming, args.mode, args.window, through)

            table.rewrite(months, content, properties)
        else:
            table.record_empty(schema, properties)

    retry_conflicts(attempt)
    found = table.committed(args.refresh_id)
    result.snapshot_id = found.snapshot_id if found else None
    result.touched = contract.encode_days(*touched) if touched else None
    result.committed_through = table.committed_through()


def load_audited(spark: SparkSession, args: Args, spec: QualitySpec) -> MergeResult:
    """Write-audit-publish of one landing on the cluster (see `tollwatch.spark.audit`)."""
    from tollwatch.spark.audit import PUBLISH_ATTEMPTS, MainMoved, SparkBranches, hold_record, judge, read_upstream_days

    branch = contract.audit_branch(args.refresh_id)
    branches = SparkBranches(spark, args.table)
    if branches.main.committed(args.refresh_id) is not None:
        return load(spark, replace(args, branch=contract.MAIN))  # published before: a replay
    if branches.main.exists():
        held = branches.held(args.refresh_id)
        if held is not None:  # a replay of a held load stays held: nothing is loaded or judged again
            log.info("refresh %s is held on %s: nothing to do", args.refresh_id, held.branch)
            return _held_result(args, held)
        settled = branches.settled(args.refresh_id)
        if settled is not None and settled.action == "discarded":
            result = MergeResult(args.table, args.mode, args.refresh_id, published=False)
            result.settled = settled.model_dump(mode="json")
            return result
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        result = load(spark, replace(args, branch=branch))
        with readable(args.landing) as landing:
            manifest = read_manifest(spark, landing)
            upstream = read_upstream_days(spark, landing)
        touched = contract.decode_days(result.touched)
        quality = judge(
            spark,
            args.table,
            branch,
            touched,
            spec,
            upstream_by_day=upstream,
            rows_read=result.rows_read,
            rows_rejected=result.rows_rejected,
            columns=list(manifest.columns),
            rows_written=result.rows_written,
        )
        result.branch, result.quality = branch, quality.brief()
        if quality.verdict == "held":
            extra = {
                "flow_run_id": args.flow_run_id,
                "rows_fetched": manifest.rows,
                "rows_written": result.rows_written,
                "rows_rejected": result.rows_rejected,
                "committed_through": result.committed_through,
            }
            record = hold_record(
                args.refresh_id, branch, result.snapshot_id or 0, args.mode, args.window, touched, quality, extra
            )
            branches.hold(record)
            log.warning("held refresh %s on %s: %s failed", args.refresh_id, branch, ", ".join(record.failing))
            result.published = False
            return result
        try:
            result.snapshot_id = branches.publish(branch)
        except MainMoved as exc:
            log.warning("%s; writing the load again on the new main (attempt %d)", exc, attempt)
            branches.drop(branch)
            continue
        result.committed_through = branches.main.committed_through()
        log.info("published %s: main at snapshot %s (%s)", branch, result.snapshot_id, quality.verdict)
        return result
    raise RuntimeError(f"refresh {args.refresh_id}: main moved {PUBLISH_ATTEMPTS} times before this load published")


def _held_result(args: Args, held: HoldRecord) -> MergeResult:
    """A replay of a held load: the hold as recorded, nothing loaded or judged again."""
    result = MergeResult(args.table, args.mode, args.refresh_id, published=False, branch=held.branch)
    result.snapshot_id = held.snapshot_id
    result.touched = contract.encode_days(held.touched.start, held.touched.stop) if held.touched else None
    result.quality = {**held.quality, "verdict": "held"}
    return result


def main(argv: Sequence[str] | None = None, spark: SparkSession | None = None) -> dict[str, Any]:
    """Entry point (Databricks passes the task's parameters as argv); prints and returns the result."""
    log_to_driver()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    session = spark or SparkSession.builder.appName("tollwatch-merge").getOrCreate()
    if args.audit:
        from tollwatch.contract.quality import load_spec

        spec = load_spec(Path(args.quality_spec) if args.quality_spec else None)
        return print_result(load_audited(session, args, spec).as_dict())
    return print_result(load(session, args).as_dict())


if __name__ == "__main__":
    main()
