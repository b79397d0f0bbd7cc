"""One conformance suite, run against every Storage backend: a local directory and S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from kdcache.core.storage import FsspecStorage, LocalStorage, Storage, open_storage


class StorageConformance:
    """What every :class:`Storage` must do; subclasses provide the ``storage`` fixture."""

    def test_is_a_storage(self, storage: Storage) -> None:
        assert isinstance(storage, Storage)

    def test_bytes_round_trip_and_overwrite(self, storage: Storage) -> None:
        storage.write_bytes("a/b/c.bin", b"\x00first\xff")
        assert storage.read_bytes("a/b/c.bin") == b"\x00first\xff"
        storage.write_bytes("a/b/c.bin", b"second")
        assert storage.read_bytes("a/b/c.bin") == b"second"
        assert storage.size("a/b/c.bin") == 6

    def test_empty_object(self, storage: Storage) -> None:
        storage.write_bytes("empty", b"")
        assert storage.exists("empty")
        assert storage.read_bytes("empty") == b""
        assert storage.size("empty") == 0

    def test_missing_key(self, storage: Storage) -> None:
        assert not storage.exists("nope/x")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("nope/x")

    def test_list_is_recursive_sorted_and_relative(self, storage: Storage) -> None:
        for key in ("p/2.json", "p/1.json", "p/q/3.json", "other/4.json"):
            storage.write_bytes(key, key.encode())
        assert storage.list("p") == ["p/1.json", "p/2.json", "p/q/3.json"]
        assert storage.list("") == ["other/4.json", "p/1.json", "p/2.json", "p/q/3.json"]
        assert storage.list("missing") == []

    def test_a_write_leaves_no_temporary_objects(self, storage: Storage) -> None:
        storage.write_bytes("k/v", b"x" * 100_000)
        assert storage.list("") == ["k/v"]

    def test_delete_is_idempotent(self, storage: Storage) -> None:
        storage.write_bytes("d/x", b"1")
        storage.delete("d/x")
        storage.delete("d/x")
        assert not storage.exists("d/x")
        assert storage.list("d") == []

    def test_child_descends(self, storage: Storage) -> None:
        child = storage.child("caches/abc")
        child.write_bytes("k", b"v")
        assert child.url.endswith("caches/abc")
        assert storage.read_bytes("caches/abc/k") == b"v"
        assert child.list("") == ["k"]
        assert storage.list("caches") == ["caches/abc/k"]

    def test_open_storage_reopens_the_same_place(
        self, storage: Storage, storage_options: dict[str, Any] | None
    ) -> None:
        storage.write_bytes("same", b"place")
        again = open_storage(storage.url, storage_options)
        assert type(again) is type(storage)
        assert again.read_bytes("same") == b"place"

    def test_zarr_store_round_trip(self, storage: Storage) -> None:
        sub = storage.child("z")
        group = zarr.open_group(sub.zarr_store(read_only=False), mode="w-")
        arr = group.create_array("x", shape=(6, 4), dtype="float32", chunks=(2, 4))
        arr[:] = np.arange(24, dtype="float32").reshape(6, 4)
        read = zarr.open_group(sub.zarr_store(read_only=True), mode="r")
        np.testing.assert_array_equal(read["x"][:], np.arange(24).reshape(6, 4))  # type: ignore[index]
        assert "z/zarr.json" in storage.list("z")


class TestLocalStorage(StorageConformance):
    @pytest.fixture
    def storage_options(self) -> None:
        return None

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        return LocalStorage(tmp_path / "root")


class TestS3Storage(StorageConformance):
    @pytest.fixture
    def storage_options(self, s3_options: dict[str, Any]) -> dict[str, Any]:
        return s3_options

    @pytest.fixture
    def storage(self, s3_bucket: str, s3_options: dict[str, Any]) -> Storage:
        return FsspecStorage(f"s3://{s3_bucket}/prefix", s3_options)

    def test_open_storage_picks_fsspec_for_s3(self, storage: Storage) -> None:
        assert isinstance(storage, FsspecStorage)
        assert storage.url.startswith("s3://")


def test_credentials_and_endpoint_from_the_usual_aws_variables(
    s3_endpoint: str, s3_bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No storage options: s3fs (botocore) reads AWS_ENDPOINT_URL, keys and region."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    # A distinct option keeps fsspec from handing back an instance made before the variables.
    storage = open_storage(f"s3://{s3_bucket}/env", {"skip_instance_cache": True})
    storage.write_bytes("k", b"from env")
    assert FsspecStorage(f"s3://{s3_bucket}", s3_options).read_bytes("env/k") == b"from env"
