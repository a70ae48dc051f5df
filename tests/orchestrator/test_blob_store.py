"""The blob store's two namespaces: models (served after a route's check), sites' uploads (never served)."""

from __future__ import annotations

import hashlib

import pytest

from fedhealth.core import InputError, NotFoundError
from fedhealth.orchestrator import BlobStore
from fedhealth.orchestrator._blobs import BlobKind


@pytest.fixture
def blobs(tmp_path):
    return BlobStore(tmp_path / "blobs")


def test_an_upload_is_not_readable_as_a_model_and_a_model_not_as_an_upload(blobs):
    update = blobs.put(b"a site's raw update", kind=BlobKind.UPDATE)
    model = blobs.put(b"a global model")
    with pytest.raises(NotFoundError):
        blobs.get(update)
    with pytest.raises(NotFoundError):
        blobs.get_if_small(update, 1 << 20)
    assert not blobs.exists(update)
    assert blobs.get(update, kind=BlobKind.UPDATE) == b"a site's raw update"
    assert blobs.get(model) == b"a global model"
    # on disk, uploads sit in their own folder, outside the models' tree
    assert blobs.path(update, BlobKind.UPDATE).exists()
    assert not blobs.path(update).exists()


def test_a_streamed_upload_is_hashed_checked_and_committed_or_discarded(blobs):
    data = b"x" * 100_000
    writer = blobs.writer(BlobKind.UPDATE)
    for i in range(0, len(data), 4096):
        writer.write(data[i : i + 4096])
    assert writer.size == len(data)
    assert writer.digest == hashlib.sha256(data).hexdigest()
    assert writer.read() == data
    assert writer.commit() == writer.digest
    assert blobs.get(writer.digest, kind=BlobKind.UPDATE) == data
    writer.discard()  # after a commit: a no-op
    assert blobs.get(writer.digest, kind=BlobKind.UPDATE) == data

    dropped = blobs.writer(BlobKind.UPDATE)
    dropped.write(b"refused")
    dropped.discard()
    with pytest.raises(NotFoundError):
        blobs.get(hashlib.sha256(b"refused").hexdigest(), kind=BlobKind.UPDATE)
    leftovers = [
        p for p in blobs.root_of(BlobKind.UPDATE).rglob("*") if p.is_file() and p.name.endswith(".tmp")
    ]
    assert leftovers == []


def test_an_update_stored_before_uploads_had_their_own_folder_is_still_aggregated(blobs):
    legacy = blobs.put(b"uploaded by an older version")  # where the old store put everything
    assert blobs.get(legacy, kind=BlobKind.UPDATE) == b"uploaded by an older version"


@pytest.mark.parametrize("digest", ["../" * 3 + "etc/passwd", "A" * 64, "a" * 63, ""])
def test_only_sha256_digests_name_blobs(blobs, digest):
    with pytest.raises(InputError):
        blobs.get(digest)
    with pytest.raises(InputError):
        blobs.get(digest, kind=BlobKind.UPDATE)
