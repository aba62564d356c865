"""The one standard-library patch tollwatch makes for Prefect (tollwatch.prefect.internals.share_ca_bundle_contexts)."""

from __future__ import annotations

import ssl

import certifi
import pytest

from tollwatch.prefect import internals


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ssl, "create_default_context", ssl.create_default_context)  # undone after the test
    internals.share_ca_bundle_contexts()
    return ssl.create_default_context


def test_a_ca_bundle_is_parsed_once_and_its_context_shared(patched):
    assert patched(cafile=certifi.where()) is patched(cafile=certifi.where())


def test_every_other_call_shape_still_gets_a_context_of_its_own(patched):
    """Prefect's insecure mode edits the context it gets: it must never be one somebody else holds."""
    assert patched() is not patched()
    assert patched(ssl.Purpose.CLIENT_AUTH, cafile=certifi.where()) is not patched(cafile=certifi.where())


def test_applying_it_twice_wraps_once(patched):
    internals.share_ca_bundle_contexts()
    assert ssl.create_default_context is patched


def test_it_refuses_an_unchecked_prefect(monkeypatch):
    monkeypatch.setattr(internals, "prefect_version", lambda: "3.99.0")
    with pytest.raises(internals.PrefectInternalsError, match=r"Prefect 3\.99\.0 is installed"):
        internals.share_ca_bundle_contexts()
