"""Every access of tollwatch.prefect.internals, checked against the installed Prefect (one test each).

When Prefect is upgraded, this file says which internal moved; the version gate says it before anything runs.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import uuid

import pytest

from tollwatch.prefect import internals


def test_the_installed_prefect_is_one_the_internals_were_checked_on():
    assert internals.prefect_version() in internals.CHECKED_ON
    internals.require_checked("a test")  # does not raise


@pytest.mark.parametrize("version", ["3.10.0", "4.0.0", "3.7.8"])
def test_an_unchecked_prefect_series_is_refused_with_what_to_do(version):
    with pytest.raises(internals.PrefectInternalsError) as refused:
        internals.require_checked("saving a block", version)
    message = str(refused.value)
    assert f"Prefect {version} is installed" in message
    assert "3.9.1" in message
    assert "test_prefect_internals.py" in message  # where the accesses are checked


def test_a_patch_release_of_a_checked_series_is_admitted():
    internals.require_checked("a test", "3.9.7")


def test_every_access_asks_the_version_gate_first(monkeypatch):
    """On an unknown Prefect every access fails with the gate's sentence, not deep inside Prefect."""
    from prefect.blocks.system import Secret

    monkeypatch.setattr(internals, "prefect_version", lambda: "3.99.0")
    internals.server_automation_models.cache_clear()
    ids = {"block_schema_id": uuid.uuid4(), "block_type_id": uuid.uuid4()}
    for call in (
        internals.server_app,
        internals.server_automation_models,
        internals.refresh_settings,
        internals.flush_at_exit,
        lambda: internals.block_schema_checksum(Secret(value="x")),
        lambda: internals.block_document(Secret(value="x"), name="n", **ids),
    ):
        with pytest.raises(internals.PrefectInternalsError, match=r"Prefect 3\.99\.0 is installed"):
            call()
    internals.server_automation_models.cache_clear()


def test_the_server_app_is_the_one_prefect_caches_for_its_own_in_process_clients():
    from prefect.server.api.server import create_app

    app = internals.server_app()
    assert create_app() is app
    assert "/api" in [
        getattr(route, "path", None) for route in app.routes
    ]  # the API, mounted as `prefect server start` does


def test_the_server_automation_models_validate_what_the_client_models_let_through():
    core, actions = internals.server_automation_models()
    assert {"run-deployment", "send-notification", "do-nothing"} <= set(actions)
    # a Jinja template error is the server's to find: the client's schema accepts it
    template = {"type": "send-notification", "block_document_id": str(uuid.uuid4()), "body": "{{ unclosed"}
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        actions["send-notification"].model_validate(template)
    assert core.model_fields.keys() >= {"name", "trigger", "actions"}


def test_refresh_settings_rereads_the_environment(monkeypatch):
    from prefect.settings import get_current_settings

    before = get_current_settings().client.max_retries
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", str(before + 7))
    internals.refresh_settings()
    try:
        assert get_current_settings().client.max_retries == before + 7
    finally:
        monkeypatch.delenv("PREFECT_CLIENT_MAX_RETRIES")
        internals.refresh_settings()
    assert get_current_settings().client.max_retries == before


def test_the_engine_module_runs_as_main_and_refuses_a_missing_flow_run_id():
    """What a process worker runs per flow run; the warm server runs the same module as __main__."""
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": "/nonexistent-prefect-home", "PREFECT_API_URL": ""}
    done = subprocess.run(
        [sys.executable, "-m", internals.ENGINE_MODULE, "not-a-uuid"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 1
    assert "Invalid flow run id" in done.stderr + done.stdout


def test_flush_at_exit_runs_the_handlers_prefect_registers(tmp_path):
    """In a child that ends with os._exit, flush_at_exit is what runs Prefect's exit handlers (and ours)."""
    marker = tmp_path / "flushed"
    script = textwrap.dedent(
        f"""
        import atexit, os
        from tollwatch.prefect.internals import flush_at_exit
        atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
        flush_at_exit()
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert marker.read_text() == "yes"


def test_prefect_drains_its_event_and_log_workers_from_an_atexit_handler():
    """What flush_at_exit relies on: the event and log services drain when their loop thread shuts down, and
    the loop thread's shutdown is an `atexit` handler (not threading's exit hook, which os._exit skips too)."""
    import prefect._internal.concurrency.services as services
    import prefect._internal.concurrency.threads as threads

    assert "loop_thread.add_shutdown_call(create_call(self.drain))" in inspect.getsource(services)
    assert "atexit.register(self.shutdown)" in inspect.getsource(threads)


def test_a_block_document_carries_its_secret_and_the_checksum_save_uses():
    from prefect.blocks.system import Secret

    block = Secret(value="marker-not-a-secret")
    schema_id, type_id = uuid.uuid4(), uuid.uuid4()
    document = internals.block_document(block, name="n", block_schema_id=schema_id, block_type_id=type_id)
    assert document.name == "n"
    assert document.block_schema_id == schema_id
    assert document.block_type_id == type_id
    assert document.data["value"] == "marker-not-a-secret"  # include_secrets: the server stores the real value
    assert internals.block_schema_checksum(block).startswith("sha256:")
    assert internals.block_schema_checksum(block) == internals.block_schema_checksum(Secret(value="other"))


def test_the_slot_lost_message_is_the_one_prefects_core_policy_sets():
    """Read as text: importing core_policy alone trips Prefect's own circular import."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("prefect.server.orchestration.core_policy")
    assert spec is not None
    assert spec.origin is not None
    assert f'message="{internals.SLOT_LOST_MESSAGE} - "' in Path(spec.origin).read_text()
