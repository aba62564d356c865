"""Reading a sealed landing with Spark: its manifest, then its gzip'd JSON pages as all-string rows.

Where the landing is decides how it is read:
- `abfss://…`, `file://…`, a path, `dbfs:/…`: by Spark, where it is (a Databricks cluster reads the landing
  container through ABFS);
- an Azure Blob `https://<account>.blob.<suffix>/<container>/…` URL: rewritten to `abfss://` (Spark has no https
  filesystem);
- any other `http(s)://` URL (the Azurite emulator, which has no ABFS endpoint): the driver downloads the landing
  with azure-storage-blob (connection string from `TOLLWATCH_STORAGE_CONNECTION_STRING`, never from the command
  line) into a local directory that Spark then reads. That works on `local[*]`, where executors share the driver's
  disk, which is the only place an emulator runs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tollwatch.contract import table as contract
from tollwatch.spark.rows import PAGE, POS, raw_schema

CONNECTION_STRING_ENV = "TOLLWATCH_STORAGE_CONNECTION_STRING"


@dataclass(frozen=True)
class Manifest:
    """The part of the landing manifest (`tollwatch.core.landing.LandingManifest`) the merge needs."""

    pages: tuple[str, ...]
    columns: tuple[str, ...]
    rows: int
    #: The fetch's `rowsUpdatedAt` ceiling (epoch s); None for a landing sealed before it was recorded.
    through: int | None = None


def hadoop_uri(uri: str) -> str | None:
    """The URI Spark reads a landing at; None for an http(s) URL that is not Azure Blob (an emulator)."""
    uri = uri.rstrip("/")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return uri
    match = re.fullmatch(r"([a-z0-9]+)\.(?:blob|dfs)\.(.+)", parts.hostname or "")
    container, _, path = parts.path.lstrip("/").partition("/")
    if parts.scheme != "https" or not match or not container:
        return None
    account, suffix = match.groups()
    return f"abfss://{container}@{account}.dfs.{suffix}/{path}".rstrip("/")


@contextmanager
def readable(landing: str) -> Iterator[str]:
    """Where Spark can read `landing` from (see the module doc); a downloaded copy is removed afterwards."""
    uri = hadoop_uri(landing)
    if uri is not None:
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="tollwatch-landing-") as tmp:
        _download(landing, Path(tmp))
        yield Path(tmp).as_uri()


def _download(url: str, into: Path) -> None:
    """Copy an emulator landing (`http://host:port/<account>/<container>/<prefix>/`) into `into`."""
    from azure.storage.blob import ContainerClient  # only for emulator landings: not needed on a cluster

    connection_string = os.environ.get(CONNECTION_STRING_ENV)
    if not connection_string:
        raise RuntimeError(f"{url} is not an Azure Blob URL Spark can read; set {CONNECTION_STRING_ENV} to download it")
    _account, container, *prefix = unquote(urlsplit(url).path).strip("/").split("/")
    client = ContainerClient.from_connection_string(connection_string, container)
    base = "/".join(prefix).rstrip("/") + "/"
    with client:
        for blob in client.list_blobs(name_starts_with=base):
            target = into / blob.name[len(base) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.download_blob(blob.name).readall())


def read_manifest(spark: SparkSession, landing: str) -> Manifest:
    """The landing's manifest; a landing without one is incomplete (a crashed fetch) and is never loaded."""
    path = f"{landing}/manifest.json"
    try:
        text = spark.read.text(path, wholetext=True).first()
    except Exception as exc:  # AnalysisException (path not found) differs across Spark versions
        raise FileNotFoundError(f"no sealed landing at {landing} (manifest.json missing or unreadable)") from exc
    if text is None:
        raise FileNotFoundError(f"empty manifest at {path}")
    data = json.loads(text[0])
    pages = tuple(str(p["blob"]).rsplit("/", 1)[-1] for p in data.get("pages", []))
    through = data.get("through")
    if through is None and data.get("landed_at"):  # older landings: no version in them is newer than their seal
        through = int(datetime.fromisoformat(str(data["landed_at"]).replace("Z", "+00:00")).timestamp())
    return Manifest(
        pages=pages,
        columns=tuple(data.get("columns", [])),
        rows=sum(int(p.get("rows", 0)) for p in data.get("pages", [])),
        through=None if through is None else int(through),
    )


def read_pages(
    spark: SparkSession, landing: str, manifest: Manifest, columns: tuple[contract.Column, ...]
) -> DataFrame:
    """The landed rows as strings, with their page number and position in the page (the dedupe's tie-break).

    Each page is one gzip'd JSON array, read whole (multiLine); a corrupt page fails the job (FAILFAST) as it fails
    the local writer. A page is never split, so monotonically_increasing_id right after the scan increases with the
    row's place in its page.
    """
    raw = raw_schema(columns)
    if not manifest.pages:
        return spark.createDataFrame([], raw).withColumn(PAGE, F.lit(0)).withColumn(POS, F.lit(0).cast("long"))
    order = F.create_map(*[F.lit(x) for i, name in enumerate(manifest.pages) for x in (name, i)])
    scanned = (
        spark.read.schema(raw)
        .option("multiLine", True)
        .option("mode", "FAILFAST")
        .json([f"{landing}/{name}" for name in manifest.pages])
        .select("*", F.col("_metadata.file_path").alias("__file"))
        .withColumn(POS, F.monotonically_increasing_id())
    )
    return scanned.withColumn(PAGE, order[F.regexp_extract(F.col("__file"), r"([^/]+)$", 1)]).drop("__file")
