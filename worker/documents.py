"""Documents of a text dataset: a field of every JSON line, or of every row of a HF dataset.

A document is a string (``text_field``) or a conversation (``messages_field``: a list of
``{role, content}``). Errors name the file, the line (JSON lines, 1-based) or row (HF datasets,
0-based within the split) and the field. ``max_rows`` keeps the first documents only.

Hugging Face datasets come from local files only: a ``datasets.save_to_disk`` folder (a
``Dataset`` or a ``DatasetDict``, whose ``split`` is taken), or parquet / arrow / json / jsonl
files (one file, or a folder of them), loaded as the split ``split``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdcache.core.documents import check_messages, check_text
from kdcache.core.errors import DatasetError
from kdcache.core.fingerprint import HF_DATA_SUFFIXES

__all__ = ["hf_records", "jsonl_records", "read_documents"]

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, object) of every non-blank line; ``where`` is ``"<path> line <n>"``."""
    try:
        fh = path.open(encoding="utf-8")
    except OSError as err:
        raise DatasetError(
            f"cannot read {path}: {err.strerror or err}", field="dataset.jsonl"
        ) from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(
                    f"{where}: not valid JSON ({err.msg})", field="dataset.jsonl"
                ) from None


def _data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix in HF_DATA_SUFFIXES]
    kinds = {_BUILDERS[p.suffix] for p in files}
    if not files:
        raise DatasetError(
            f"{path} is neither a datasets.save_to_disk folder nor holds "
            f"{'/'.join(sorted(HF_DATA_SUFFIXES))} files",
            field="dataset.hf",
        )
    if len(kinds) > 1:
        raise DatasetError(f"{path} mixes file kinds {sorted(kinds)}; keep one", field="dataset.hf")
    return kinds.pop(), [str(p) for p in files]


def _load_hf(path: Path, split: str, cache_dir: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetError(
                    f"{path} has no split {split!r} (it has {sorted(loaded)})",
                    field="dataset.split",
                )
            return loaded[split]
        return loaded
    builder, files = _data_files(path)
    return datasets.load_dataset(
        builder, data_files={split: files}, split=split, cache_dir=cache_dir
    )


def hf_records(path: Path, split: str, field: str) -> Iterator[tuple[str, Any]]:
    """(where, value of ``field``) of every row of a local HF dataset's ``split``."""
    with tempfile.TemporaryDirectory(prefix="kdcache-hf-") as cache_dir:
        try:
            ds = _load_hf(path, split, cache_dir)
        except DatasetError:
            raise
        except Exception as err:  # datasets raises many kinds for unreadable files
            raise DatasetError(
                f"cannot load {path}: {type(err).__name__}: {err}", field="dataset.hf"
            ) from None
        if field not in ds.column_names:
            raise DatasetError(
                f"{path} (split {split!r}) has no field {field!r} "
                f"(its columns are {ds.column_names})"
            )
        for i, value in enumerate(ds[field]):
            yield f"{path} (split {split!r}) row {i}", value


def read_documents(
    *,
    jsonl: Path | None = None,
    hf: Path | None = None,
    split: str = "train",
    text_field: str = "text",
    messages_field: str | None = None,
    max_rows: int | None = None,
) -> list[tuple[str, Any]]:
    """(where, document) of every document (a string or a checked conversation), in order."""
    field = messages_field or text_field
    records: Iterator[tuple[str, Any]]
    if jsonl is not None:
        records = ((where, _field_of(obj, where, field)) for where, obj in jsonl_records(jsonl))
    elif hf is not None:
        records = hf_records(hf, split, field)
    else:
        raise DatasetError("read_documents needs a jsonl file or a HF dataset")
    docs: list[tuple[str, Any]] = []
    try:
        for where, value in records:
            if max_rows is not None and len(docs) >= max_rows:
                break
            if messages_field is not None:
                docs.append((where, check_messages(value, where, field)))
            else:
                docs.append((where, check_text(value, where, field)))
    except DatasetError as err:
        if err.field is None:  # the row's own fault: name the spec field that reads it
            err.field = "dataset.messages_field" if messages_field else "dataset.text_field"
        raise
    return docs


def _field_of(obj: Any, where: str, field: str) -> Any:
    if not isinstance(obj, dict) or field not in obj:
        raise DatasetError(f"{where}: no field {field!r}")
    return obj[field]
