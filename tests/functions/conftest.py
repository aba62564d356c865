"""Fixtures for the Function app: the built app, settings that match Microsoft's sample payloads, a dev host.

Every test gets its own upstream *domain* (it only names the dataset resource), so its events have their own
resource id and deterministic ids on the shared Prefect server, and its own blob container (from `env`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import azure.functions as func
import pytest

from tollwatch import resources
from tollwatch.contract.settings import Settings, load_settings
from tollwatch_dev.funchost import FunctionHost, load_function_app

#: The `topic` / `source` of Microsoft's BlobCreated samples, accepted as-is.
SAMPLE_TOPIC = (
    "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/"
    "my-storage-account"
)
SECRET = "current-secret-0123456789"
NEXT_SECRET = "next-secret-9876543210"
FUNCTION_KEY = "local-function-key-abcdef"


@dataclass(frozen=True)
class FnEnv:
    """What a test needs to know about its environment."""

    api_url: str
    domain: str
    resource_id: str

    def settings(self) -> Settings:
        return load_settings()


@pytest.fixture(scope="session")
def app() -> func.FunctionApp:
    """The app exactly as the Functions host indexes it: `function_app.app`."""
    return load_function_app()


@pytest.fixture
def fenv(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FnEnv:
    domain = f"t{uuid.uuid4().hex[:12]}.test"
    values = {
        "TOLLWATCH_UPSTREAM_DOMAIN": domain,
        "TOLLWATCH_EMIT_MAX_ATTEMPTS": "2",
        "TOLLWATCH_EMIT_BACKOFF_MAX_S": "0.05",
        "TOLLWATCH_EVENTGRID_SOURCE_TOPICS": SAMPLE_TOPIC,
        "TOLLWATCH_EVENTGRID_CONTAINER": "test-container",
        "TOLLWATCH_EVENTGRID_SECRETS": f"{SECRET},{NEXT_SECRET}",
        "TOLLWATCH_FUNCTION_KEY": FUNCTION_KEY,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("TOLLWATCH_PREFECT_WEBHOOK_URL", "TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT", "TOLLWATCH_WATCH_SCHEDULE"):
        monkeypatch.delenv(key, raising=False)
    settings = load_settings()
    resource = f"socrata.{domain}.{settings.upstream_dataset_id}"
    return FnEnv(api_url=env["PREFECT_API_URL"], domain=domain, resource_id=resource)


@pytest.fixture
def devhost(app: func.FunctionApp, fenv: FnEnv) -> Iterator[FunctionHost]:
    """The app's HTTP routes served on loopback with function-key auth, like `tollwatch functions serve`."""
    with FunctionHost(app, function_key=FUNCTION_KEY) as host:
        yield host


@pytest.fixture
def state(fenv: FnEnv):
    """The watermark store of this test's dataset (real Azurite)."""
    return resources.watermark_store(fenv.settings())
