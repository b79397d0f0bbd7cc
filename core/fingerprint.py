"""Content fingerprints of teachers, tokenizers and datasets, and the cache id built from them.

A fingerprint hashes what determines the numbers, never where the files live: moving a model
directory keeps its caches. The cache id is a hash of (teacher, dataset, outputs, format version),
so submitting the same job twice finds the same cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdcache.core._fpcache import cached_hash

__all__ = [
    "HF_DATA_SUFFIXES",
    "cache_id",
    "canonical_json",
    "dataset_files",
    "dataset_fingerprint",
    "hash_file",
    "module_file",
    "sha256_file",
    "teacher_files",
    "teacher_fingerprint",
    "tokenizer_files",
    "tokenizer_fingerprint",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
HF_DATA_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl")
"""Files a Hugging Face dataset may be given as (alone, or as a folder of them)."""
_BLOCK = 8 << 20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same object always hashes the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes; remembered per file version (size, mtime, inode...) so that
    a file is read once per host, not on every run (see :mod:`kdcache.core._fpcache`)."""
    return cached_hash(path, sha256_file)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (weight files can be tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _hash_named_files(root: Path, names: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(names):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(hash_file(p).encode())
    return h.hexdigest()


def teacher_files(hf_dir: str | Path) -> list[Path]:
    """The files of a HF directory that its fingerprint hashes: config and weights."""
    root = Path(hf_dir)
    files = [root / n for n in CONFIG_FILES if (root / n).is_file()]
    return files + [p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]


def module_file(module: str) -> Path | None:
    """The source file of a ``module:`` teacher's module, where there is one."""
    try:
        found = importlib.util.find_spec(module.split(":", 1)[0])
    except (ImportError, ValueError):
        found = None
    if found is not None and found.origin and Path(found.origin).is_file():
        return Path(found.origin)
    return None


def tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    """The files of a tokenizer directory that its fingerprint hashes."""
    root = Path(tokenizer_dir)
    return [root / n for n in TOKENIZER_FILES if (root / n).is_file()]


def dataset_files(path: str | Path) -> list[Path]:
    """The files a dataset fingerprint hashes: the file, or a folder's files but hidden ones."""
    root = Path(path)
    if not root.is_dir():
        return [root]
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def teacher_fingerprint(hf_dir: str | None = None, module: str | None = None) -> str:
    """Hash of a HF directory's config and weight files, or of a module teacher's source file."""
    if hf_dir is not None:
        return "hf:" + _hash_named_files(Path(hf_dir), teacher_files(hf_dir))
    if module is None:
        raise ValueError("teacher_fingerprint needs hf_dir or module")
    h = hashlib.sha256(module.encode())
    source = module_file(module)
    if source is not None:
        h.update(hash_file(source).encode())
    return "module:" + h.hexdigest()


def tokenizer_fingerprint(tokenizer_dir: str | None) -> str | None:
    """Hash of a tokenizer's files, or None where the directory holds no tokenizer."""
    if tokenizer_dir is None:
        return None
    files = tokenizer_files(tokenizer_dir)
    return "tok:" + _hash_named_files(Path(tokenizer_dir), files) if files else None


def dataset_fingerprint(path: str | Path, params: dict[str, Any] | None = None) -> str:
    """Hash of a dataset's bytes plus the parameters that turn it into rows.

    ``path`` is a file, or a folder (a ``datasets.save_to_disk`` folder, a folder of data files):
    then every file in it but hidden ones, by relative path and content.
    """
    root = Path(path)
    if root.is_dir():
        h = hashlib.sha256(("dir:" + _hash_named_files(root, dataset_files(root))).encode())
    else:
        h = hashlib.sha256(hash_file(root).encode())
    if params:
        h.update(canonical_json(params).encode())
    return h.hexdigest()


def cache_id(identity: dict[str, Any]) -> str:
    """The content address of a cache: 32 hex digits of SHA-256 over its identity."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:32]
