"""The table contract as data: what both writers are built on (fast, no services)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tollwatch.contract import compute
from tollwatch.contract import table as contract
from tollwatch.core import schema

ROOT = Path(__file__).resolve().parents[2]


def test_every_check_names_a_column_of_the_table_and_every_required_column_is_checked():
    names = {c.name for c in contract.COLUMNS}
    assert {check.column for check in contract.CHECKS} <= names
    required = [c.name for c in contract.COLUMNS if c.required]
    checked = [check.column for check in contract.CHECKS if check.kind in ("required", "one_of")]
    assert set(required) <= set(checked)
    assert len({check.reason for check in contract.CHECKS}) == len(contract.CHECKS)  # a reason names one rule


def test_the_patterns_mean_the_same_in_re2_and_java_syntax():
    """RE2 (pyarrow) and java.util.regex differ on `\\s`, `\\d` and `$`: the contract uses neither."""
    for pattern in (contract.INTEGER_PATTERN, contract.DATE_PATTERN, contract.TIMESTAMP_PATTERN):
        assert not re.search(r"\\[sdw]|\$", pattern)
    values = pa.array([" 12 ", "12\n", "\u000b12", "\u0663", "1 2", "0012"])
    matched = pc.match_substring_regex(values, contract.INTEGER_PATTERN).to_pylist()
    assert matched == [True, True, False, False, False, True]


def test_the_arrow_schema_is_the_contracts():
    fields = [(f.name, f.nullable) for f in schema.base_schema()]
    assert fields == [(c.name, not c.required) for c in contract.COLUMNS]
    assert schema.KEY == contract.KEY
    target = schema.target_schema(["plaza_id", ":id", ":version", ":other", "vehicles_bus", "Remarks"])
    assert target.names[-2:] == ["Remarks", "vehicles_bus"]


def test_the_ledger_encodes_days_both_ways():
    from datetime import date

    text = contract.encode_days(date(2024, 1, 1), date(2024, 2, 1))
    assert text == "2024-01-01/2024-02-01"
    assert contract.decode_days(text) == (date(2024, 1, 1), date(2024, 2, 1))
    assert contract.decode_days(None) is None


def test_the_iceberg_runtime_the_build_fetches_is_the_one_clusters_get():
    pom = (ROOT / "jvm" / "pom.xml").read_text()
    version = re.search(r"<iceberg.version>([^<]+)</iceberg.version>", pom)
    assert version is not None
    assert compute.ICEBERG_SPARK_RUNTIME.endswith(f":{version.group(1)}")
    assert "iceberg-spark-runtime-3.5_2.12" in compute.ICEBERG_SPARK_RUNTIME  # pyspark 3.5, Scala 2.12


def test_the_spark_entry_points_import_nothing_a_databricks_runtime_lacks():
    """On a cluster the wheel's entry points run beside pyspark: importing them must not pull in the flows' stack
    (prefect, pyiceberg, pyarrow, pydantic, the Azure SDK — the latter only lazily, for an emulator landing)."""
    import subprocess
    import sys

    probe = (
        "import sys, tollwatch.spark.merge, tollwatch.spark.daily_totals\n"
        "heavy = {'prefect', 'pyiceberg', 'pyarrow', 'pydantic', 'azure', 'httpx', 'pandas'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
        "print(sorted(m for m in sys.modules if m.startswith('tollwatch.') and not m.startswith(('tollwatch.spark', "
        "'tollwatch.contract'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.splitlines() == ["[]", "[]"]


def test_the_audit_on_the_cluster_needs_only_pyarrow_and_pydantic_beside_pyspark():
    """`tollwatch-merge --audit` (Databricks) runs the checks on the driver: pyarrow (in every Databricks runtime)
    and pydantic (a dependency the wheel installs), and nothing else of the flows' stack."""
    import subprocess
    import sys

    probe = (
        "import sys, tollwatch.spark.audit, tollwatch.contract.quality\n"
        "heavy = {'prefect', 'pyiceberg', 'pyarrow', 'pydantic', 'azure', 'httpx', 'pandas', 'tenacity'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
        "print(sorted(m for m in sys.modules if m.startswith('tollwatch.') and not m.startswith(('tollwatch.spark', "
        "'tollwatch.contract', 'tollwatch.core.quality'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.splitlines() == ["['pyarrow', 'pydantic']", "['tollwatch.core']"]
