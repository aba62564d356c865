"""The Spark merge's `--branch` (write-audit-publish): the flow passes the load's audit branch, which the merge
turns into the Spark identifier `<table>.branch_<name>`; a name that is not a plain identifier part is refused by
argparse before Spark starts. The merges on a branch run on real Spark in tests/integration/test_engines.py."""

from __future__ import annotations

import pytest

from tollwatch.contract import table as contract
from tollwatch.spark import merge as spark_merge
from tollwatch.spark.iceberg import IcebergTable

BASE = ["--landing", "/x", "--table", "c.bronze.t", "--mode", "refresh", "--refresh-id", "r"]


def test_a_branch_is_taken_and_main_is_the_default():
    assert spark_merge.parse_args([*BASE, "--branch", "audit_x"]).branch == "audit_x"
    assert spark_merge.parse_args([*BASE, "--branch=audit_x"]).branch == "audit_x"
    assert spark_merge.parse_args(BASE).branch == contract.MAIN


def test_the_flows_audit_branch_of_any_refresh_id_is_accepted():
    """Whatever a refresh id holds (dashes, colons, non-ASCII), its audit branch is a name the merge takes."""
    for refresh_id in ("0d9a-4f1c:2024-01-01T00:00", "rafraîchi é", "a.b/c"):
        branch = contract.audit_branch(refresh_id)
        assert spark_merge.parse_args([*BASE, "--branch", branch]).branch == branch


@pytest.mark.parametrize("branch", ["a-b", "", "main.x", "1st", "a b", "`x`"])
def test_a_branch_that_is_not_an_identifier_is_refused_before_spark_starts(branch: str, capsys):
    with pytest.raises(SystemExit) as exited:
        spark_merge.parse_args([*BASE, "--branch", branch])
    assert exited.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert "usage: tollwatch-merge" in err
    assert f"--branch {branch!r} is not a branch name of letters, digits and _" in err


def test_the_branch_names_the_write_target():
    """Writes go to Iceberg's Spark identifier of the branch; `main` writes the table itself."""
    assert IcebergTable(None, "c.bronze.t", "audit_x").target == "c.bronze.t.branch_audit_x"  # type: ignore[arg-type]
    assert IcebergTable(None, "c.bronze.t").target == "c.bronze.t"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "audit"),
    [([], False), (["--audit"], True), (["--audit=yes"], True), (["--audit=no"], False), (["--audit="], False)],
)
def test_audit_is_a_switch_a_job_parameter_can_also_set(argv, audit):
    """The flow passes `--audit`; the bundle's merge job passes `--audit=yes` (its parameter), `--audit=` when a run
    empties it."""
    assert spark_merge.parse_args([*BASE, *argv]).audit is audit


def test_audit_picks_its_own_branch():
    with pytest.raises(SystemExit):
        spark_merge.parse_args([*BASE, "--audit", "--branch", "audit_x"])
