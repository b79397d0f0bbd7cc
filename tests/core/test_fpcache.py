"""Remembered file hashes: a file version is read once; any change is hashed afresh."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from kdcache.core import fingerprint as fp
from kdcache.core._fpcache import cache_dir, cached_hash


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Every real read of a file's bytes for hashing, in order."""
    monkeypatch.setenv("KDCACHE_FINGERPRINT_CACHE", str(tmp_path / "fpcache"))
    seen: list[Path] = []
    real = fp.sha256_file

    def counting(path: str | Path) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(fp, "sha256_file", counting)
    return seen


def test_a_file_version_is_read_once(reads: list[Path], tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = fp.hash_file(f)
    assert fp.hash_file(f) == first == fp.sha256_file(f)
    assert reads.count(f) == 2  # the first hash_file and the explicit sha256_file only


def test_changed_bytes_are_hashed_again_even_with_mtime_restored(
    reads: list[Path], tmp_path: Path
) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    before = fp.hash_file(f)
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or rsync -t would
    assert fp.hash_file(f) != before
    assert len(reads) == 2


def test_replaced_file_is_hashed_again(reads: list[Path], tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 10)
    a = fp.hash_file(f)
    tmp = tmp_path / "new.bin"
    tmp.write_bytes(b"y" * 10)
    os.replace(tmp, f)
    assert fp.hash_file(f) != a and len(reads) == 2


def test_broken_entries_mean_hashing_again(reads: list[Path], tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"z" * 10)
    good = fp.hash_file(f)
    folder = cache_dir()
    assert folder is not None
    (entry,) = folder.glob("*.json")
    entry.write_text("{not json")
    assert fp.hash_file(f) == good
    assert json.loads(entry.read_text())["sha256"] == good  # rewritten whole
    assert not list(folder.glob(".*.tmp"))


def test_off_switch_and_unwritable_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"q")
    calls: list[Path] = []

    def compute(p: Path) -> str:
        calls.append(p)
        return "h"

    monkeypatch.setenv("KDCACHE_FINGERPRINT_CACHE", "off")
    assert cache_dir() is None
    cached_hash(f, compute), cached_hash(f, compute)
    assert len(calls) == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KDCACHE_FINGERPRINT_CACHE", str(blocker / "sub"))  # cannot be created
    assert cached_hash(f, compute) == "h" and len(calls) == 3


def _hash_in_child(path: str) -> str:
    return fp.hash_file(path)


def test_concurrent_processes_agree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDCACHE_FINGERPRINT_CACHE", str(tmp_path / "shared"))
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 20))
    with ProcessPoolExecutor(4) as pool:
        digests = list(pool.map(_hash_in_child, [str(f)] * 8))
    assert set(digests) == {fp.sha256_file(f)}
    entries = list((tmp_path / "shared").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".json"
