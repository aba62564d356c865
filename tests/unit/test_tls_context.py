"""Outbound HTTP clients share one TLS context per process (found by bench figure 9, the load on the intake).

The Function app makes its clients per invocation, so that their connections close with it; each new httpx client
parsed certifi's whole CA bundle again (~24 ms of CPU). Every Event Grid delivery, handshake and backfill request
paid it, and on two shared cores the handshake, which does no I/O, answered 10 times a second.
"""

from __future__ import annotations

import ssl

import pytest

from tollwatch import resources
from tollwatch.adapters import net
from tollwatch.adapters.socrata import build_http_client
from tollwatch.contract.settings import load_settings


@pytest.fixture
def bundle_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every CA bundle parsed from now on (a fresh process: the shared context is made again)."""
    net.tls_context.cache_clear()
    loads: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args or kwargs)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    yield loads
    net.tls_context.cache_clear()  # the next test's clients must not keep a context made under the patch


def test_invocations_parse_the_ca_bundle_once_per_process_not_once_per_client(bundle_loads):
    settings = load_settings()
    for _ in range(3):  # three invocations: an emitter and an upstream client each, closed at its end
        with resources.emit_http_client(settings), build_http_client("https://data.ny.gov", 5.0):
            pass
    assert len(bundle_loads) == 1


def test_the_shared_context_still_verifies_certificates_and_host_names(bundle_loads):
    context = net.tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs()  # a bundle was loaded
