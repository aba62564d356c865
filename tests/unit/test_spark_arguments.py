"""The Spark entry point's side that runs before Spark does: its arguments (as spark-submit and Databricks pass them)
and the landing URIs it hands Spark. The merges themselves run on real Spark in tests/integration/test_engines.py.
"""

from __future__ import annotations

import pytest

from tollwatch.spark import merge as spark_merge


def test_landing_urls_become_uris_spark_can_read():
    from tollwatch.spark.landing import hadoop_uri

    blob = "https://acct.blob.core.windows.net/tollwatch/raw/qzve-kjga/mode=refresh/refresh=r/run=1/"
    assert hadoop_uri(blob) == "abfss://tollwatch@acct.dfs.core.windows.net/raw/qzve-kjga/mode=refresh/refresh=r/run=1"
    assert (
        hadoop_uri("https://acct.dfs.core.usgovcloudapi.net/c/raw") == "abfss://c@acct.dfs.core.usgovcloudapi.net/raw"
    )
    assert hadoop_uri("abfss://c@a.dfs.core.windows.net/raw/") == "abfss://c@a.dfs.core.windows.net/raw"
    assert hadoop_uri("/tmp/landed/") == "/tmp/landed"
    assert hadoop_uri("http://127.0.0.1:10000/devstoreaccount1/c/raw") is None  # the emulator: downloaded first


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "window", "--refresh-id", "r"], "needs --start and --stop"),
        (["--mode", "refresh", "--refresh-id", "r", "--start", "2024-01-02"], "go together"),
        (["--mode", "window", "--refresh-id", "r", "--start", "2024-01-02", "--stop", "2024-01-02"], "after"),
        (["--mode", "refresh", "--refresh-id", " "], "must not be empty"),
    ],
)
def test_bad_arguments_fail_before_spark_starts(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit):
        spark_merge.parse_args(["--landing", "/x", "--table", "c.bronze.t", *argv])
    assert message in capsys.readouterr().err


def test_job_parameters_a_run_leaves_unset_arrive_empty_and_mean_not_given():
    """Databricks passes every job parameter, unset ones as `--start=`: a refresh merge must still parse."""
    args = spark_merge.parse_args(
        [
            "--landing=/x",
            "--table=c.bronze.t",
            "--mode=refresh",
            "--refresh-id=r",
            "--start=",
            "--stop=",
            "--flow-run-id=",
        ]
    )
    assert (args.window, args.flow_run_id) == (None, None)
