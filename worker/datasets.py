"""Dataset sources: the static rows of token ids the teacher runs on, read by row range.

Two kinds of source, one :class:`DatasetSource` protocol:

- :class:`TokensSource`: an (N, T) integer ``.npy`` array, memory-mapped;
- :class:`TextSource` (:class:`JsonlSource`, :class:`HFSource`): documents of JSON lines or of a
  local Hugging Face dataset (:mod:`kdcache.worker.documents`), plain text or conversations
  (:mod:`kdcache.worker.chat`), tokenised here (:mod:`kdcache.worker.packing`). ``pack=True``
  concatenates documents (each followed by EOS when the tokenizer has one) and cuts the stream
  into ``seq_len`` rows, dropping the last partial row; ``pack=False`` makes one row per document,
  truncated to ``seq_len`` and right-padded with ``pad_token_id``.

Both are deterministic: the same file (and tokenizer) always gives the same rows. Each also gives
the rows' loss mask: ``loss_mask[j]`` is true when position j's prediction of token j+1 is
trained, so it is false on the last position of every row and wherever token j+1 is padding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kdcache.core.errors import DatasetError, Problem, SpecError
from kdcache.worker.chat import ChatRenderer
from kdcache.worker.documents import read_documents
from kdcache.worker.packing import pack_rows, pad_rows

__all__ = [
    "DatasetSource",
    "HFSource",
    "JsonlSource",
    "TextSource",
    "TokensSource",
    "open_checked",
    "open_source",
    "shifted_mask",
]

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

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """(end - start, T) bool: position j's prediction of token j+1 is trained."""
        ...


def shifted_mask(targets: np.ndarray) -> np.ndarray:
    """Loss mask from per-token target flags: ``mask[:, j] = targets[:, j + 1]``, last = False.

    targets: (n, T) bool, true where a token is a trained target; returns (n, T) bool.
    """
    out = np.zeros(targets.shape, dtype=bool)
    out[:, :-1] = targets[:, 1:]
    return out


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

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """Every position but the last of each row: token rows carry no padding information."""
        _check_range(start, end, self.num_rows, str(self.path))
        return shifted_mask(np.ones((end - start, self.seq_len), dtype=bool))


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # any loader failure means the same thing to the user
        raise DatasetError(f"cannot load tokenizer {path}: {type(err).__name__}: {err}") from None


class TextSource:
    """Documents (plain text or conversations) tokenised into fixed-length rows (module doc).

    ``kind`` is ``"jsonl"`` (a JSON lines file) or ``"hf"`` (a local Hugging Face dataset, of
    which ``split`` is read). ``messages_field`` makes the documents conversations, rendered with
    the tokenizer's chat template and trained on the assistant's tokens only
    (:mod:`kdcache.worker.chat`); otherwise ``text_field`` holds plain text. ``eos_id`` /
    ``pad_id`` default to the tokenizer's; ``pad_token_id`` falls back to EOS, then 0.
    ``lengths``: (N,) int64 real (unpadded) tokens per row.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        kind: str,
        tokenizer_path: str | Path,
        seq_len: int,
        text_field: str = "text",
        messages_field: str | None = None,
        split: str = "train",
        max_rows: int | None = None,
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
        renderer = ChatRenderer(tok, str(tokenizer_path)) if messages_field else None
        self.eos_token_id: int | None = eos_id if eos_id is not None else tok.eos_token_id
        pad = pad_id if pad_id is not None else tok.pad_token_id
        self.pad_token_id: int = next(x for x in (pad, self.eos_token_id, 0) if x is not None)
        docs = read_documents(
            jsonl=self.path if kind == "jsonl" else None,
            hf=self.path if kind == "hf" else None,
            split=split,
            text_field=text_field,
            messages_field=messages_field,
            max_rows=max_rows,
        )
        ids, flags = _tokenise(tok, docs, renderer, add_special_tokens)
        if pack:
            rows, self.lengths, targets = pack_rows(
                ids, flags, seq_len, self.eos_token_id, sep_flag=renderer is None
            )
        else:
            rows, self.lengths, targets = pad_rows(ids, flags, seq_len, self.pad_token_id)
        self._rows, self._mask = rows, shifted_mask(targets)
        self.num_rows: int = int(rows.shape[0])
        if self.num_rows == 0:
            raise DatasetError(
                f"{self.path}: yields no rows of {seq_len} tokens "
                f"({len(docs)} documents, pack={pack})"
            )
        self.fingerprint_extra: dict[str, Any] = {
            "source": kind,
            "field": messages_field or text_field,
            "chat": renderer.method if renderer is not None else None,
            "split": split if kind == "hf" else None,
            "max_rows": max_rows,
            "seq_len": seq_len,
            "pack": pack,
            "eos_id": self.eos_token_id,
            "pad_id": self.pad_token_id,
            "add_special_tokens": add_special_tokens,
            # compatibility with readers of the plain-text key
            "text_field": text_field,
        }
        log.info("%s: %d documents -> %d rows of %d", self.path, len(docs), self.num_rows, seq_len)

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, seq_len) int64 copy of rows ``start..end-1``."""
        _check_range(start, end, self.num_rows, str(self.path))
        return self._rows[start:end].copy()

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """(end - start, seq_len) bool: false on the last column, where the target is padding,
        and (conversations) where it is not the assistant's."""
        _check_range(start, end, self.num_rows, str(self.path))
        return self._mask[start:end].copy()


class JsonlSource(TextSource):
    """A JSON lines file, one document per line (a :class:`TextSource` of kind ``jsonl``)."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        super().__init__(path, kind="jsonl", **kwargs)


class HFSource(TextSource):
    """A local Hugging Face dataset (a :class:`TextSource` of kind ``hf``)."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        super().__init__(path, kind="hf", **kwargs)


def _tokenise(
    tok: Any,
    docs: list[tuple[str, Any]],
    renderer: ChatRenderer | None,
    add_special_tokens: bool,
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each document and their target flags (all true for plain text)."""
    if renderer is None:
        texts = [text for _, text in docs]
        ids: list[list[int]] = (
            tok(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
        )
        return ids, [np.ones(len(d), dtype=bool) for d in ids]
    ids, flags = [], []
    for where, conv in docs:
        d, f = renderer.render(conv, where)
        ids.append(d)
        flags.append(f)
    return ids, flags


def open_source(dataset_spec: Any, teacher_dir: str | None = None) -> DatasetSource:
    """Open the source a ``DatasetSpec`` (or any object with its attributes) names.

    The tokenizer of a ``jsonl`` or ``hf`` dataset defaults to ``teacher_dir``. A ``tokens``
    array whose rows differ from a given ``seq_len`` is an error.
    """
    tokens = getattr(dataset_spec, "tokens", None)
    jsonl, hf = getattr(dataset_spec, "jsonl", None), getattr(dataset_spec, "hf", None)
    seq_len: int | None = getattr(dataset_spec, "seq_len", None)
    if sum(x is not None for x in (tokens, jsonl, hf)) != 1:
        raise DatasetError("the dataset spec must name exactly one of 'tokens', 'jsonl' or 'hf'")
    if tokens is not None:
        src = TokensSource(tokens)
        if seq_len is not None and seq_len != src.seq_len:
            raise DatasetError(f"{tokens}: rows have {src.seq_len} tokens, seq_len is {seq_len}")
        return src
    path, kind = (jsonl, "jsonl") if jsonl is not None else (hf, "hf")
    tokenizer = getattr(dataset_spec, "tokenizer", None) or teacher_dir
    if tokenizer is None:
        raise DatasetError(f"{path}: a {kind} dataset needs a tokenizer (none given, no teacher)")
    if seq_len is None:
        raise DatasetError(f"{path}: a {kind} dataset needs seq_len")
    cls = JsonlSource if kind == "jsonl" else HFSource
    return cls(
        str(path),
        tokenizer_path=tokenizer,
        seq_len=seq_len,
        text_field=getattr(dataset_spec, "text_field", None) or "text",
        messages_field=getattr(dataset_spec, "messages_field", None),
        split=getattr(dataset_spec, "split", None) or "train",
        max_rows=getattr(dataset_spec, "max_rows", None),
        pack=getattr(dataset_spec, "pack", True),
    )


def open_checked(dataset_spec: Any, teacher_dir: str | None = None) -> DatasetSource:
    """:func:`open_source`, with bad input that names its spec field raised as a SpecError.

    Such input (a conversation with an unknown role, a missing field, a tokenizer without a
    chat template) is found before anything is written, so it is a spec problem (CLI exit 2,
    one line naming the field and the row).
    """
    try:
        return open_source(dataset_spec, teacher_dir)
    except DatasetError as err:
        if err.field is None:
            raise
        raise SpecError([Problem(err.field, str(err))]) from None
