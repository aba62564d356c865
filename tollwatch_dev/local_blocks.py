"""The Prefect blocks the shipped automations name, pointed at the local dev inbox (dev only: loopback URLs).

`automations/ingest-failed.yaml`, `job-failed.yaml` and `freshness-sla.yaml` notify through
`custom-webhook/tollwatch-alerts`; `automations/subscriptions/city-dashboard.yaml` calls
`webhook/city-dashboard-webhook`. In production those blocks hold real endpoints (created in the UI or with
`prefect block create`); locally they post to `tollwatch_dev.inbox`, so every alert and webhook call can be
seen in `<inbox>/_received`.

`ensure_local_blocks` is idempotent: it overwrites the documents in place, so their ids (which applied
automations reference) stay the same across runs.

    python -m tollwatch_dev.local_blocks --inbox-url http://127.0.0.1:PORT   # prints the block ids
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING
from uuid import UUID

from pydantic import SecretStr

if TYPE_CHECKING:
    from prefect.blocks.core import Block
    from prefect.client.orchestration import SyncPrefectClient

ALERTS_BLOCK = "tollwatch-alerts"
DASHBOARD_WEBHOOK_BLOCK = "city-dashboard-webhook"
#: The names `ensure_local_blocks` creates.
LOCAL_BLOCKS = frozenset({ALERTS_BLOCK, DASHBOARD_WEBHOOK_BLOCK})


def local_blocks(inbox_url: str) -> dict[str, Block]:
    """The dev blocks by name, posting to `<inbox>/alerts` and `<inbox>/city-dashboard`."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.webhook import Webhook

    base = inbox_url.rstrip("/")
    return {
        ALERTS_BLOCK: CustomWebhookNotificationBlock(
            name=ALERTS_BLOCK,
            url=f"{base}/alerts",
            method="POST",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
            allow_private_urls=True,  # loopback: refused otherwise
        ),
        DASHBOARD_WEBHOOK_BLOCK: Webhook(
            method="POST",
            url=SecretStr(f"{base}/city-dashboard"),
            headers={"Content-Type": "application/json"},  # type: ignore[arg-type]
            allow_private_urls=True,
        ),
    }


def _save(client: SyncPrefectClient, name: str, block: Block) -> UUID:
    """Create or overwrite one block document through `client` (Block.save would use the global settings'
    API instead of the client it is given)."""
    from prefect.client.schemas.actions import BlockDocumentCreate, BlockDocumentUpdate
    from prefect.exceptions import ObjectNotFound

    from tollwatch.prefect.internals import block_document, block_schema_checksum

    slug = block.get_block_type_slug()
    block_type = client.read_block_type_by_slug(slug)
    schema = client.read_block_schema_by_checksum(block_schema_checksum(block))
    document = block_document(block, name=name, block_schema_id=schema.id, block_type_id=block_type.id)
    try:
        existing = client.read_block_document_by_name(name, slug, include_secrets=False)
    except ObjectNotFound:
        created = client.create_block_document(
            BlockDocumentCreate(name=name, block_type_id=block_type.id, block_schema_id=schema.id, data=document.data)
        )
        return created.id
    client.update_block_document(
        existing.id, BlockDocumentUpdate(block_schema_id=schema.id, data=document.data, merge_existing_data=False)
    )
    return existing.id


def ensure_local_blocks(inbox_url: str, client: SyncPrefectClient | None = None) -> dict[str, UUID]:
    """Create or overwrite the dev blocks; returns their ids by `<block-type-slug>/<name>` (as YAML names them).

    Without a client, one is opened on the current Prefect settings (PREFECT_API_URL).
    """
    from prefect.client.orchestration import get_client

    ids: dict[str, UUID] = {}
    context = nullcontext(client) if client is not None else get_client(sync_client=True)
    with context as api:
        for name, block in local_blocks(inbox_url).items():
            ids[f"{block.get_block_type_slug()}/{name}"] = _save(api, name, block)
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollwatch_dev.local_blocks", description="Create the dev blocks.")
    parser.add_argument("--inbox-url", required=True, help="base URL of a running tollwatch_dev.inbox")
    args = parser.parse_args(argv)
    for ref, block_id in ensure_local_blocks(args.inbox_url).items():
        print(f"{ref} {block_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
