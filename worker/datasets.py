"""Dataset sources: the static rows of token ids the teacher runs on, read by row range.

Two sources, one :class:`DatasetSource` protocol:

- :class:`TokensSource`: an (N, T) integer ``.npy`` array, memory-mapped;
- :class:`JsonlSource`: JSON lines, one document per line, tokenised here. ``pack=True``
  concatenates documents (each followed by EOS when the tokenizer has one) and cuts the stream
  into ``seq_len`` rows, dropping the last partial row; ``pack=False`` makes one row per document,
  truncated to ``seq_len`` and right-padded with ``pad_token_id``.

Both are deterministic: the same file (and tokenizer) always gives the same rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kdcache.core.errors import DatasetError

__all__ = ["DatasetSource", "JsonlSource", "TokensSource", "open_source"]

log = logging.getLogger(__name__)


@runtime_checkable
class DatasetSource(Protocol):
    """Rows of token ids. ``fingerprint_extra``: parameters that shape the rows (hashed with the
    file's bytes into the dataset fingerprint)."""

    num_rows: int
    seq_len: int
    fingerprint_extra: dict[str, Any]

    def rows(self, start: int, end: int) -> np.ndarray:
        """Rows ``start..end-1`` as an (end - start, T) int64 array."""
        ...


def _check_range(start: int, end: int, num_rows: int, name: str) -> None:
    if not 0 <= start <= end <= num_rows:
        raise DatasetError(f"{name}: rows {start}..{end} out of range 0..{num_rows}")


class TokensSource:
    """An (N, T) integer ``.npy`` file, memory-mapped; rows are read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DatasetError(f"{self.path}: no such file") from None
        except (OSError, ValueError) as err:
            raise DatasetError(f"{self.path} is not a readable .npy array: {err}") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            shape = getattr(arr, "shape", None)
            raise DatasetError(f"{self.path}: must be a 2-D (N, T) array, got shape {shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise DatasetError(f"{self.path}: must hold integer token ids, got dtype {arr.dtype}")
        self._arr = arr
        self.num_rows: int = int(arr.shape[0])
        self.seq_len: int = int(arr.shape[1])
        self.fingerprint_extra: dict[str, Any] = {"source": "tokens"}

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, T) int64 copy of rows ``start..end-1``."""
        _check_range(start, end, self.num_rows, str(self.path))
        return np.asarray(self._arr[start:end], dtype=np.int64)


def _read_texts(path: Path, text_field: str) -> list[str]:
    """One string per non-blank line; errors name the 1-based line number and the field."""
    texts: list[str] = []
    try:
        fh = path.open(encoding="utf-8")
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DatasetError(f"{path} line {lineno}: no field {text_field!r}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise DatasetError(
                    f"{path} line {lineno}: field {text_field!r} must be a string, "
                    f"got {type(text).__name__}"
                )
            texts.append(text)
    return texts


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # any loader failure means the same thing to the user
        raise DatasetError(f"cannot load tokenizer {path}: {type(err).__name__}: {err}") from None


class JsonlSource:
    """JSON lines tokenised with a local HF tokenizer into fixed-length rows (see module doc).

    ``eos_id`` / ``pad_id`` default to the tokenizer's; ``pad_token_id`` falls back to EOS, then 0.
    ``lengths``: (N,) int64 real (unpadded) tokens per row.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer_path: str | Path,
        seq_len: int,
        text_field: str = "text",
        pack: bool = True,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        if seq_len < 1:
            raise DatasetError(f"seq_len must be >= 1, got {seq_len}")
        self.path = Path(path)
        self.seq_len: int = seq_len
        self.pack = pack
        tok = _load_tokenizer(str(tokenizer_path))
        self.eos_token_id: int | None = eos_id if eos_id is not None else tok.eos_token_id
        pad = pad_id if pad_id is not None else tok.pad_token_id
        self.pad_token_id: int = next(x for x in (pad, self.eos_token_id, 0) if x is not None)
        texts = _read_texts(self.path, text_field)
        docs: list[list[int]] = (
            tok(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
        )
        self._rows, self.lengths = self._pack(docs) if pack else self._pad(docs)
        self.num_rows: int = int(self._rows.shape[0])
        if self.num_rows == 0:
            raise DatasetError(
                f"{self.path}: yields no rows of {seq_len} tokens "
                f"({len(docs)} documents, pack={pack})"
            )
        self.fingerprint_extra: dict[str, Any] = {
            "source": "jsonl",
            "text_field": text_field,
            "seq_len": seq_len,
            "pack": pack,
            "eos_id": self.eos_token_id,
            "pad_id": self.pad_token_id,
            "add_special_tokens": add_special_tokens,
        }
        log.info("%s: %d documents -> %d rows of %d", self.path, len(docs), self.num_rows, seq_len)

    def _pack(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        sep = [self.eos_token_id] if self.eos_token_id is not None else []
        stream = np.fromiter((i for d in docs for i in (*d, *sep)), dtype=np.int64, count=-1)
        n = stream.size // self.seq_len
        rows = stream[: n * self.seq_len].reshape(n, self.seq_len)
        return rows, np.full(n, self.seq_len, dtype=np.int64)

    def _pad(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.full((len(docs), self.seq_len), self.pad_token_id, dtype=np.int64)
        lengths = np.empty(len(docs), dtype=np.int64)
        for r, d in enumerate(docs):
            d = d[: self.seq_len]
            rows[r, : len(d)] = d
            lengths[r] = len(d)
        return rows, lengths

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, seq_len) int64 copy of rows ``start..end-1``."""
        _check_range(start, end, self.num_rows, str(self.path))
        return self._rows[start:end].copy()


def open_source(dataset_spec: Any, teacher_dir: str | None = None) -> DatasetSource:
    """Open the source a ``DatasetSpec`` (or any object with its attributes) names.

    The tokenizer of a ``jsonl`` dataset defaults to ``teacher_dir``. A ``tokens`` array whose
    rows differ from a given ``seq_len`` is an error.
    """
    tokens, jsonl = getattr(dataset_spec, "tokens", None), getattr(dataset_spec, "jsonl", None)
    seq_len: int | None = getattr(dataset_spec, "seq_len", None)
    if (tokens is None) == (jsonl is None):
        raise DatasetError("the dataset spec must name exactly one of 'tokens' or 'jsonl'")
    if tokens is not None:
        src = TokensSource(tokens)
        if seq_len is not None and seq_len != src.seq_len:
            raise DatasetError(f"{tokens}: rows have {src.seq_len} tokens, seq_len is {seq_len}")
        return src
    tokenizer = getattr(dataset_spec, "tokenizer", None) or teacher_dir
    if tokenizer is None:
        raise DatasetError(f"{jsonl}: a jsonl dataset needs a tokenizer (none given, no teacher)")
    if seq_len is None:
        raise DatasetError(f"{jsonl}: a jsonl dataset needs seq_len")
    return JsonlSource(
        str(jsonl),
        tokenizer_path=tokenizer,
        seq_len=seq_len,
        text_field=getattr(dataset_spec, "text_field", "text"),
        pack=getattr(dataset_spec, "pack", True),
    )
