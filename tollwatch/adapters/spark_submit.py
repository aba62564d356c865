"""Run the wheel's Spark entry point with `spark-submit` on any Spark master (`TOLLWATCH_ENGINE=spark`).

The same `tollwatch.spark.merge` that Databricks runs as a `python_wheel_task`, submitted to `local[*]` by default or
to any standalone/YARN/Kubernetes master by setting, so teams on EMR, Dataproc or their own cluster get the same
path. Locally the Spark catalog is Iceberg's JDBC catalog on the very catalog database pyiceberg's SQL catalog uses
(their schemas are compatible, and Iceberg's JDBC catalog keys rows by catalog name, so the Spark catalog is named
like pyiceberg's): both engines commit to one table.

Secrets never go on the command line (it is visible to every local user in `ps`): the storage connection string
reaches the driver through its environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import TypeAdapter

from tollwatch.contract import compute
from tollwatch.contract import table as contract
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.result import MergeResult

log = logging.getLogger(__name__)

#: The Iceberg runtime for pyspark 3.5 / Scala 2.12 and the SQLite JDBC driver (`make jars` fetches them).
REQUIRED_JARS = ("iceberg-spark-runtime-3.5_2.12-", "sqlite-jdbc-")


class SparkEngineError(TollwatchError):
    """The Spark engine cannot run as configured, or the job failed (the message says which and why)."""


#: The merge's report as the job prints it: one dataclass on both sides (tollwatch.contract.result), validated here.
_RESULT = TypeAdapter(MergeResult)


def read_result(text: str | None) -> MergeResult | None:
    """The last result line in a driver's output, validated (None when the job printed none)."""
    found = None
    for line in (text or "").splitlines():
        if line.startswith(contract.RESULT_MARKER):
            found = _RESULT.validate_json(line[len(contract.RESULT_MARKER) :])
    return found


def find_jars(directory: Path) -> list[Path]:
    """The runtime jars in `directory`; a clear error naming the command that fetches them."""
    jars = sorted(directory.glob("*.jar")) if directory.is_dir() else []
    missing = [prefix for prefix in REQUIRED_JARS if not any(j.name.startswith(prefix) for j in jars)]
    if missing:
        raise SparkEngineError(
            f"no {', '.join(p.rstrip('-') for p in missing)} jar in {directory.resolve()}: run `make jars` "
            "(mvn -f jvm/pom.xml dependency:copy-dependencies) or set TOLLWATCH_SPARK_JARS_DIR"
        )
    return jars


def catalog_conf(catalog: str, properties: dict[str, str]) -> dict[str, str]:
    """Spark conf of an Iceberg catalog on the same database and warehouse as pyiceberg's SQL catalog."""
    if properties.get("type") != "sql" or not properties.get("uri", "").startswith("sqlite:///"):
        raise SparkEngineError(
            "the spark engine shares pyiceberg's SQL catalog on SQLite (the default); for another catalog give "
            "its Spark conf in TOLLWATCH_SPARK_CONF"
        )
    database = properties["uri"].removeprefix("sqlite:///")
    prefix = f"spark.sql.catalog.{catalog}"
    return {
        "spark.sql.extensions": compute.ICEBERG_SQL_EXTENSIONS,
        prefix: compute.ICEBERG_SPARK_CATALOG,
        f"{prefix}.catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
        f"{prefix}.uri": f"jdbc:sqlite:{database}",
        f"{prefix}.warehouse": properties["warehouse"],
        # every load re-reads the table's current metadata: the other engine may have committed since
        f"{prefix}.cache-enabled": "false",
        # pyiceberg creates the catalog's tables; Iceberg's own check for them (JdbcCatalog.initializeCatalogTables)
        # leaves a DatabaseMetaData result set open, which pins a pooled SQLite connection to a read snapshot: its
        # next write then fails with SQLITE_BUSY_SNAPSHOT once pyiceberg has committed (seen on Iceberg 1.10.2)
        f"{prefix}.jdbc.init-catalog-tables": "false",
    }


def spark_submit_path(configured: str) -> str:
    """The spark-submit to run: as configured if it is a path or on PATH, else the one pyspark installed beside this
    interpreter (a venv's bin/ is not on the PATH of a worker started by its full path)."""
    if os.sep in configured or shutil.which(configured):
        return configured
    beside = Path(sys.executable).parent / configured
    if beside.exists():
        return str(beside)
    raise SparkEngineError(f"{configured!r} not found on PATH nor beside {sys.executable}: install tollwatch[spark]")


def submit_command(
    spark_submit: str, master: str, jars: list[Path], conf: dict[str, str], argv: list[str]
) -> list[str]:
    """`spark-submit` of the merge entry point's module file (what `tollwatch-merge` runs) with `argv`."""
    # the module's file, found without importing it (importing it would need pyspark in this process)
    spec = importlib.util.find_spec("tollwatch.spark.merge")
    if spec is None or spec.origin is None:
        raise SparkEngineError("tollwatch.spark.merge is not installed: reinstall tollwatch")
    command = [spark_submit_path(spark_submit), "--master", master, "--name", "tollwatch-merge"]
    if jars:
        classpath = os.pathsep.join(str(j) for j in jars)
        command += ["--jars", ",".join(str(j) for j in jars), "--driver-class-path", classpath]
    for key, value in sorted(conf.items()):
        command += ["--conf", f"{key}={value}"]
    return [*command, spec.origin, *argv]


def run(command: list[str], env: dict[str, str], *, on_line: Callable[[str], None] | None = None) -> MergeResult:
    """Run the job; its driver log lines go to `on_line` as they come; the result line is parsed from stdout."""
    environment = {**os.environ, **env, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if on_line and not line.startswith(contract.RESULT_MARKER):
            on_line(line.rstrip("\n"))
    code = process.wait()
    output = "\n".join(lines)
    if code != 0:
        tail = "\n".join(line for line in lines[-40:] if line.strip())
        raise SparkEngineError(f"spark-submit exited with {code}; the driver's last lines:\n{tail}")
    result = read_result(output)
    if result is None:
        raise SparkEngineError("spark-submit succeeded but the job printed no TOLLWATCH_RESULT line")
    return result


def spark_table_name(catalog: str, table: str) -> str:
    """`catalog.namespace.table` as Spark addresses it."""
    return f"{catalog}.{table}"


def landing_env(connection_string: str | None, landing_uri: str) -> dict[str, str]:
    """What the driver needs to read a landing Spark cannot read itself (the Azurite emulator, over http)."""
    if connection_string and urlsplit(landing_uri).scheme == "http":
        return {"TOLLWATCH_STORAGE_CONNECTION_STRING": connection_string}
    return {}
