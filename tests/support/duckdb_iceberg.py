# ruff: noqa: S608  (SQL is built from constant column names and locations quoted by `_literal`)
"""DuckDB as an independent reader of tollwatch's Iceberg table, offline.

Engine-agreement tests need a reader that shares no code with the writers: pyiceberg reads what pyiceberg wrote
through the same library, so a bug in how it plans a scan (a deleted data file still listed, an old snapshot read,
a partition pruned wrongly) would agree with itself. DuckDB's `iceberg` extension is a separate implementation of
the spec (C++, its own manifest and metadata parsing), and it reads a table from its `*.metadata.json` alone: no
catalog, no server.

No network: the extensions come from the PyPI wheels `duckdb-extension-{parquet,avro,iceberg}`, which ship only the
binary, at `<package>/extensions/v<duckdb version>/<name>.duckdb_extension` (their `__init__.py` is empty; the
`import_extension` helper of their README lives in another package, `duckdb-extensions`, that installs into
DuckDB's extension directory, which we do not want). We `LOAD` each file by path on a connection whose
extension autoinstall and autoload are off, so nothing is fetched or silently loaded from `~/.duckdb`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

#: Load order matters: `iceberg` loads `avro` (manifests are Avro) and `parquet` (data files) while it initialises;
#: with autoload/autoinstall off it fails ("Install it first using INSTALL avro") unless both are already loaded.
#: (`parquet` is also statically linked into the PyPI `duckdb` wheel, where its LOAD is a no-op; loading it from its
#: wheel keeps the reader working on a DuckDB build without it.)
EXTENSIONS: tuple[str, ...] = ("parquet", "avro", "iceberg")

#: The natural key of a row (as in `tollwatch.core.schema.KEY`, restated so this reader shares nothing with the
#: writers).
KEY = ("plaza_id", "date", "hour", "direction")


class MissingExtensionWheel(RuntimeError):
    """An extension's wheel is absent, or carries no binary for the installed DuckDB version."""


def wheel_name(extension: str) -> str:
    """The PyPI distribution that carries `extension`'s binary."""
    return f"duckdb-extension-{extension}"


def extension_path(extension: str) -> Path:
    """The `.duckdb_extension` file shipped by `extension`'s wheel, for the installed DuckDB version.

    The binary is tied to the exact DuckDB version (DuckDB refuses one built for another), which is why the wheel
    keeps it under `extensions/v<version>/` and why its version is pinned to duckdb's.
    """
    package = f"duckdb_extension_{extension}"
    wanted = f"{wheel_name(extension)}=={duckdb.__version__}"
    spec = importlib.util.find_spec(package)  # a top-level package: found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtensionWheel(
            f"DuckDB extension {extension!r} is not installed: the wheel {wheel_name(extension)} "
            f"(package {package}) is missing; install {wanted}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "extensions"
    path = root / f"v{duckdb.__version__}" / f"{extension}.duckdb_extension"
    if not path.is_file():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise MissingExtensionWheel(
            f"the wheel {wheel_name(extension)} has no {extension} extension for DuckDB {duckdb.__version__} "
            f"(looked for {path}; it has {found or 'none'}); install {wanted}"
        )
    return path


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with parquet, avro and iceberg loaded from their wheels, nothing else.

    Autoinstall and autoload are off so a missing extension is an error here, not a download (tests run offline) or a
    quiet load of whatever happens to sit in `~/.duckdb/extensions`.
    """
    paths = [extension_path(name) for name in EXTENSIONS]  # all checked before anything is loaded
    conn = duckdb.connect(
        ":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    for path in paths:
        conn.execute(f"LOAD {_literal(str(path))}")
    return conn


def scan_sql(metadata_location: str) -> str:
    """`iceberg_scan(...)` of the table version that `metadata_location` (a `*.metadata.json`) describes.

    Usable wherever a table goes in DuckDB SQL (`SELECT ... FROM <this>`). DuckDB 1.5.5 accepts both a `file://`
    URI, as pyiceberg reports it (`Table.metadata_location`), and a plain path, so the location is passed as it is:
    the data-file paths inside the manifests are `file://` URIs anyway. The file pins one snapshot (its
    `current-snapshot-id`): give the newest metadata file to read the table as it is now.
    """
    return f"iceberg_scan({_literal(metadata_location)})"


def read_table(conn: duckdb.DuckDBPyConnection, metadata_location: str) -> duckdb.DuckDBPyRelation:
    """All rows of the table version at `metadata_location`, as a DuckDB relation (`.to_arrow_table()`, ...)."""
    return conn.sql(f"SELECT * FROM {scan_sql(metadata_location)}")


@dataclass(frozen=True)
class Totals:
    """What engine-agreement tests compare: the same numbers from any reader mean the same rows were read."""

    rows: int
    distinct_keys: int
    vehicles_e_zpass: int
    vehicles_vtoll: int  # sum of coalesce(vehicles_vtoll, 0)
    rows_per_day: dict[date, int]


def totals(conn: duckdb.DuckDBPyConnection, metadata_location: str) -> Totals:
    """The `Totals` of the table version at `metadata_location`, computed by DuckDB."""
    scan = scan_sql(metadata_location)
    keys = ", ".join(KEY)
    row = conn.sql(
        f"""
        SELECT count(*),
               (SELECT count(*) FROM (SELECT DISTINCT {keys} FROM {scan})),
               coalesce(sum(vehicles_e_zpass), 0),
               coalesce(sum(coalesce(vehicles_vtoll, 0)), 0)
        FROM {scan}
        """
    ).fetchone()
    assert row is not None
    per_day = conn.sql(f"SELECT date, count(*) FROM {scan} GROUP BY date ORDER BY date").fetchall()
    return Totals(
        rows=int(row[0]),
        distinct_keys=int(row[1]),
        vehicles_e_zpass=int(row[2]),
        vehicles_vtoll=int(row[3]),
        rows_per_day={day: int(n) for day, n in per_day},
    )


def arrow_totals(table: pa.Table) -> Totals:
    """The same `Totals` computed with pyarrow, for rows read by another engine (e.g. `Table.scan().to_arrow()`)."""
    per_day = table.group_by("date", use_threads=False).aggregate([("date", "count")])
    return Totals(
        rows=table.num_rows,
        distinct_keys=table.select(list(KEY)).group_by(list(KEY), use_threads=False).aggregate([]).num_rows,
        vehicles_e_zpass=int(pc.sum(table["vehicles_e_zpass"]).as_py() or 0),
        vehicles_vtoll=int(pc.sum(pc.fill_null(table["vehicles_vtoll"], 0)).as_py() or 0),
        rows_per_day=dict(zip(per_day["date"].to_pylist(), per_day["date_count"].to_pylist(), strict=True)),
    )


def _literal(text: str) -> str:
    """A SQL string literal (paths can hold quotes; DuckDB takes no bound parameters in LOAD)."""
    return "'" + text.replace("'", "''") + "'"
