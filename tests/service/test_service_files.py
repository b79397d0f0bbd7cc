"""Which store keys may be served, and reading them from a local root or an fsspec URL."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

import kdcache.service.files as files_module
from kdcache.service.files import CacheFiles, KeyKind, classify_key, valid_cache_id

MANIFEST: dict[str, Any] = {
    "format_version": 1,
    "cache_id": "ab",
    "num_rows": 10,
    "seq_len": 4,
    "vocab_size": 50,
    "topk": 2,
    "temperatures": [1.0],
    "hidden_layers": [3],
    "hidden_size": 8,
    "hidden_dtype": "bfloat16",
    "rows_per_shard": 4,
    "teacher_fingerprint": "t",
    "dataset_fingerprint": "d",
}


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("zarr.json", KeyKind("metadata")),
        ("topk/zarr.json", KeyKind("metadata")),
        ("hidden/3/zarr.json", KeyKind("metadata")),
        ("input_ids/c/2/0", KeyKind("chunk", 2)),
        ("topk/logprobs/c/1/0/0", KeyKind("chunk", 1)),
        ("hidden/3/c/0/0/0", KeyKind("chunk", 0)),
        ("_kdcache/shards/00000002.json", KeyKind("record", 2)),
        ("input_ids/c/2", None),  # wrong number of indices
        ("input_ids/c/2/0/0", None),
        ("hidden/4/c/0/0/0", None),  # no such array
        ("c/0/0", None),
        ("input_ids/c/x/0", None),
        ("_kdcache/shards/2.json", None),  # not the record key's spelling
        ("_kdcache/job.json", None),
        ("../zarr.json", None),
        ("./zarr.json", None),
        ("/zarr.json", None),
        ("a//zarr.json", None),
        ("input_ids/c/0/.0.partial", None),
        (".zarr.json.x.partial", None),
        ("input_ids/c/0/0.partial", None),
        ("zarr.json%00", None),
        ("", None),
        ("a/" * 300 + "zarr.json", None),
    ],
)
def test_classify_key(key: str, kind: KeyKind | None) -> None:
    assert classify_key(key, MANIFEST) == kind


def test_chunks_need_a_manifest() -> None:
    assert classify_key("input_ids/c/0/0", None) is None
    assert classify_key("zarr.json", None) == KeyKind("metadata")


@pytest.mark.parametrize("cache_id", ["ab12", "0" * 32])
def test_valid_cache_ids(cache_id: str) -> None:
    assert valid_cache_id(cache_id)


@pytest.mark.parametrize("cache_id", ["", "..", "AB", "a/b", "g1", "0" * 65])
def test_invalid_cache_ids(cache_id: str) -> None:
    assert not valid_cache_id(cache_id)


def _write_cache(base: str, write: Any) -> None:
    write(f"{base}/caches/ab/zarr.json", json.dumps({"attributes": {"kdcache": MANIFEST}}))
    write(f"{base}/caches/ab/input_ids/c/0/0", "0123456789" * 30_000)


def test_local_files_stat_blocks_manifest_and_symlink_escape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files_module, "BLOCK_BYTES", 64 << 10)

    def write(path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    _write_cache(str(tmp_path), write)
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", tmp_path / "caches/ab/input_ids/c/0/1")
    files = CacheFiles(str(tmp_path))
    st = files.stat("ab", "input_ids/c/0/0")
    assert st is not None and st.size == 300_000
    blocks = list(files.blocks("ab", "input_ids/c/0/0", 5, 290_000))
    assert len(blocks) > 1 and max(len(b) for b in blocks) <= 64 << 10  # streamed in blocks
    assert b"".join(blocks) == ("0123456789" * 30_000).encode()[5:290_005]
    whole = ("0123456789" * 30_000).encode()
    assert files.read("ab", "input_ids/c/0/0", 7, 200_000, st) == whole[7:200_007]  # one pread
    assert files.read("ab", "input_ids/c/0/0", 299_990, 100) == whole[299_990:]  # short at the end
    assert files.manifest("ab") == MANIFEST
    assert files.stat("ab", "input_ids/c/0/1") is None  # a symlink out of the root
    assert files.stat("ab", "input_ids/c/0") is None  # a directory
    assert files.stat("ab", "missing") is None
    assert files.stat("..", "secret") is None
    assert files.manifest("cd") is None


def test_read_into_never_opens_a_path_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat without a path and a key outside the root: FileNotFoundError, not the file of
    the same relative name seen from the service's working directory."""

    def write(path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    _write_cache(str(tmp_path / "root"), write)
    files = CacheFiles(str(tmp_path / "root"))
    st = files.stat("ab", "input_ids/c/0/0")
    assert st is not None
    out = memoryview(bytearray(4))
    assert files.read_into("ab", "input_ids/c/0/0", [(2, out)], st) == 4
    assert bytes(out) == b"2345"
    write(str(tmp_path / "cwd" / "outside"), "cwd file")  # "../outside" from cwd/sub
    (tmp_path / "cwd" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "cwd" / "sub")
    blind = files_module.FileStat(4, 0.0, '"x"')  # no path: the key is resolved again
    with pytest.raises(FileNotFoundError):
        files.read_into("..", "outside", [(0, memoryview(bytearray(4)))], blind)


def test_fsspec_files(tmp_path: Path) -> None:
    base = f"memory://kdcache-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    _write_cache(base, lambda p, t: fs.pipe_file(p, t.encode()))
    files = CacheFiles(base)
    st = files.stat("ab", "input_ids/c/0/0")
    assert st is not None and st.size == 300_000 and st.etag.startswith('"')
    got = b"".join(files.blocks("ab", "input_ids/c/0/0", 299_990, 10))
    assert got == b"0123456789"
    assert files.manifest("ab") == MANIFEST
    assert files.stat("ab", "nope") is None
