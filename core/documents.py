"""Documents of a dataset, checked before tokenising: fields, conversations, chat templates.

Part of the job-spec contract (``dataset.text_field`` / ``dataset.messages_field``): a
conversation is a list of ``{role, content}`` messages with known roles and at least one
assistant turn (something to train on). The service checks the first rows of a JSON lines file
at submit time (:func:`check_head`, without tokenising); the worker checks every row before it
writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdcache.core.errors import DatasetError, Problem

__all__ = ["HEAD_ROWS", "ROLES", "check_head", "check_messages", "has_chat_template"]

HEAD_ROWS = 1000
"""Documents of a JSON lines file checked at submit time (the worker checks them all)."""

ROLES = ("system", "developer", "user", "assistant", "tool")
"""Roles a conversation may use; only ``assistant`` messages are trained."""


def check_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """Validate one conversation; errors name ``where`` (file and row) and the field.

    Returns the messages as plain ``{"role", "content"}`` dicts.
    """
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise DatasetError(
            f"{where}: field {field!r} must be a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise DatasetError(f"{where}: field {field!r} is an empty conversation")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DatasetError(
                f"{where}: {field}[{i}] must be a {{role, content}} object, "
                f"got {type(msg).__name__}"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DatasetError(
                f"{where}: {field}[{i}] has unknown role {role!r} (expected one of "
                f"{', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise DatasetError(
                f"{where}: {field}[{i}].content must be a string, got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DatasetError(f"{where}: field {field!r} has no assistant turn (nothing to train on)")
    return out


def check_text(value: Any, where: str, field: str) -> str:
    """A plain-text document: the field's value must be a string."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def check_head(path: Path, field: str, messages_field: str | None) -> list[Problem]:
    """Problems in the first :data:`HEAD_ROWS` documents of a JSON lines file (at most one)."""
    name = "dataset.messages_field" if messages_field else "dataset.text_field"
    seen = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if seen >= HEAD_ROWS:
                    break
                if not line.strip():
                    continue
                seen += 1
                where = f"{path} line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    return [Problem("dataset.jsonl", f"{where}: not valid JSON ({err.msg})")]
                if not isinstance(obj, dict) or field not in obj:
                    return [Problem(name, f"{where}: no field {field!r}")]
                if messages_field:
                    check_messages(obj[field], where, field)
                else:
                    check_text(obj[field], where, field)
    except DatasetError as err:
        return [Problem(name, str(err))]
    except (OSError, UnicodeDecodeError) as err:
        return [Problem("dataset.jsonl", f"cannot read {path}: {err}")]
    return []


def has_chat_template(tokenizer_dir: str | Path) -> bool:
    """Whether a tokenizer directory holds a chat template (read without transformers)."""
    root = Path(tokenizer_dir)
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((root / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(cfg, dict) and cfg.get("chat_template"))
