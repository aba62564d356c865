"""The Databricks identity block without a server: what prefect-databricks' tasks get from it, what it stores, how
Prefect hashes it as a task input, and the references `databricks_credentials_block` accepts.

The token comes from a stand-in credential here (azure-identity's interface: `get_token(*scopes)`); the managed
identity endpoint itself, the token cache and its refresh are proven in tests/integration/test_identity.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from prefect.cache_policies import INPUTS
from prefect.serializers import JSONSerializer

from tollwatch.adapters.databricks_jobs import AZURE_DATABRICKS_SCOPE, DatabricksAuthError
from tollwatch.contract.errors import ConfigurationError
from tollwatch.contract.settings import load_settings
from tollwatch.prefect.blocks import DatabricksIdentity
from tollwatch.prefect.databricks_runner import workspace_auth
from tollwatch.resources import Resources

HOST = "adb-1234567890123456.7.azuredatabricks.net"
TOKEN = "placeholder-entra-token"


class StandInCredential:
    """azure-identity's credential interface, answering every request with one token."""

    def __init__(self, error: Exception | None = None) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.error = error

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        if self.error is not None:
            raise self.error
        return AccessToken(TOKEN, 4_102_444_800)


def test_prefect_databricks_gets_its_own_client_with_the_identitys_token_for_the_databricks_resource():
    credential = StandInCredential()
    identity = DatabricksIdentity(databricks_instance=HOST).use_credential(credential)

    client = identity.get_client()

    assert str(client.base_url) == f"https://{HOST}/api/"
    assert client.headers["Authorization"] == f"Bearer {TOKEN}"
    assert client.headers["User-Agent"].startswith("Prefect_PrefectDatabricks/")  # prefect-databricks' own client
    assert credential.scopes == [(AZURE_DATABRICKS_SCOPE,)]
    assert AZURE_DATABRICKS_SCOPE == "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default"


def test_the_block_stores_a_host_and_an_identity_id_and_no_secret():
    identity = DatabricksIdentity(databricks_instance=HOST, managed_identity_client_id="placeholder-client-id")
    identity.use_credential(StandInCredential()).get_client()

    assert DatabricksIdentity.model_json_schema()["secret_fields"] == []
    assert identity.model_dump(exclude={"block_type_slug"}) == {
        "databricks_instance": HOST,
        "managed_identity_client_id": "placeholder-client-id",
    }
    assert TOKEN not in JSONSerializer().dumps(identity).decode()


def test_prefect_hashes_the_block_as_a_task_input_without_its_credential():
    """Every Jobs API call is a task with the block as `databricks_credentials`; Prefect's default cache policy
    hashes task inputs (JSON, else cloudpickle). The credential (a lock-holding client) is private state, left out."""
    one = DatabricksIdentity(databricks_instance=HOST).use_credential(StandInCredential())
    one.get_client()
    other = DatabricksIdentity(databricks_instance=HOST)

    key = INPUTS.compute_key(task_ctx=None, inputs={"databricks_credentials": one}, flow_parameters={})  # type: ignore[arg-type]

    assert key is not None
    assert key == INPUTS.compute_key(task_ctx=None, inputs={"databricks_credentials": other}, flow_parameters={})  # type: ignore[arg-type]


def test_no_token_is_one_sentence_naming_the_workspace_and_the_identity():
    refused = StandInCredential(ClientAuthenticationError("ManagedIdentityCredential: identity not found"))
    identity = DatabricksIdentity(databricks_instance=HOST, managed_identity_client_id="placeholder-client-id")

    with pytest.raises(DatabricksAuthError) as failure:
        identity.use_credential(refused).get_client()

    assert str(failure.value) == (
        f"no Entra ID token for Azure Databricks ({HOST}) as placeholder-client-id: "
        "ClientAuthenticationError: ManagedIdentityCredential: identity not found"
    )


@pytest.mark.parametrize("host", ["https://adb-1.azuredatabricks.net", "adb-1.azuredatabricks.net/api", ""])
def test_a_host_with_a_scheme_or_path_is_refused_when_the_block_is_made(host):
    with pytest.raises(ValueError, match="databricks_instance"):
        DatabricksIdentity(databricks_instance=host)


def test_an_unknown_block_type_in_the_reference_is_refused_naming_both_kinds():
    settings = load_settings(databricks_credentials_block="secret/tollwatch-databricks")

    with Resources(settings) as res, pytest.raises(ConfigurationError) as refused:
        workspace_auth(res)

    message = str(refused.value)
    assert "'tollwatch-databricks-identity' (managed identity)" in message
    assert "'databricks-credentials' (client secret or PAT)" in message


def test_the_process_shares_one_credential_per_identity():
    with Resources(load_settings()) as res:
        assert res.identity() is res.identity(None) is res.credential
        assert res.identity("placeholder-a") is res.identity("placeholder-a")
        assert res.identity("placeholder-a") is not res.identity("placeholder-b")
        assert res.identity("placeholder-a") is not res.credential


@pytest.mark.parametrize("reference", ["https://adb-1.azuredatabricks.net", "Tollwatch", "a/b/c", ""])
def test_a_reference_that_is_no_block_name_is_refused_by_the_settings(reference):
    with pytest.raises(ValueError, match="databricks_credentials_block"):
        load_settings(databricks_credentials_block=reference)
