"""Small JSON state documents in Blob Storage, read with their ETag and written with optimistic concurrency.

Why blobs and not a database: the Function app already has a storage account, Azurite provides the same
API locally, and ETag conditions (`If-Match` to replace, `If-None-Match: *` to create) give compare-and-set,
which is all a watermark or a per-blob sequencer needs. A conditional write that loses reports `False`
instead of raising: losing a race is an expected outcome that callers decide about, not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContainerClient, ContentSettings
from pydantic import BaseModel

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_JSON = ContentSettings(content_type="application/json")


@dataclass(frozen=True)
class Versioned(Generic[M]):
    """A document and the ETag it was read with (`None`/`None` when it does not exist yet)."""

    value: M | None
    etag: str | None


class JsonBlobStore:
    """Reads and conditionally writes pydantic documents as JSON blobs in one container."""

    def __init__(self, container: ContainerClient) -> None:
        self._container = container

    @property
    def container_name(self) -> str:
        return self._container.container_name

    def read(self, name: str, model: type[M]) -> Versioned[M]:
        """The document and its ETag; a missing blob (or container) is an empty `Versioned`."""
        try:
            downloader = self._container.download_blob(name)
            data = downloader.readall()
        except ResourceNotFoundError:
            return Versioned(None, None)
        return Versioned(model.model_validate_json(data), downloader.properties.etag)

    def write(self, name: str, value: BaseModel, *, expected_etag: str | None) -> bool:
        """Write only if the blob is still what the caller read; `False` if someone else changed it first.

        `expected_etag=None` means "create, and fail if it exists" (the caller read nothing).
        """
        data = value.model_dump_json(indent=2).encode()
        try:
            if expected_etag is None:
                self._create(name, data)
            else:
                self._container.upload_blob(
                    name,
                    data,
                    overwrite=True,
                    etag=expected_etag,
                    match_condition=MatchConditions.IfNotModified,
                    content_settings=_JSON,
                )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            log.info("conditional write of %s lost a race (%s)", name, exc.error_code)
            return False
        except ResourceNotFoundError:  # replaced a blob that someone deleted meanwhile: also a lost race
            log.info("conditional write of %s lost a race (blob deleted)", name)
            return False
        return True

    def _create(self, name: str, data: bytes) -> None:
        try:
            self._container.upload_blob(name, data, overwrite=False, content_settings=_JSON)
        except ResourceNotFoundError:  # first write ever: Azurite and new accounts start without the container
            try:
                self._container.create_container()
                log.info("created blob container %s for state", self.container_name)
            except ResourceExistsError:
                pass
            self._container.upload_blob(name, data, overwrite=False, content_settings=_JSON)
