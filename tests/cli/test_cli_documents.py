"""``kdcache run`` on bad document data: one line naming the field and the row, exit 2, no cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdcache.worker import toy

GOOD = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello student"}]


def _run(job: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "run", str(job), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


def _hf_rows(path: Path, rows: list[Any]) -> Path:
    import datasets

    datasets.Dataset.from_dict({"messages": rows}).save_to_disk(str(path))
    return path


def _jsonl_rows(path: Path, rows: list[Any], key: str = "messages") -> Path:
    path.write_text("".join(json.dumps({key: r}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("unknown-role", "dataset.messages_field", "line 2: messages[0] has unknown role 'robot'"),
        ("no-assistant-hf", "dataset.messages_field", "row 2: field 'messages' has no assistant"),
        ("missing-field", "dataset.messages_field", "line 1: no field 'messages'"),
        ("no-template", "dataset.messages_field", "has no chat template"),
    ],
)
def test_bad_documents_exit_2_with_one_line(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    chat_tokenizer_dir: Path,
    tokenizer_dir: Path,
    case: str,
    field: str,
    words: str,
) -> None:
    robot = [{"role": "robot", "content": "beep"}, *GOOD]
    question = [{"role": "user", "content": "hello"}]
    dataset: dict[str, Any] = {
        "messages_field": "messages",
        "tokenizer": str(chat_tokenizer_dir),
        "seq_len": 32,
    }
    if case == "unknown-role":
        dataset["jsonl"] = str(_jsonl_rows(tmp_path / "d.jsonl", [GOOD, robot]))
    elif case == "no-assistant-hf":
        dataset["hf"] = str(_hf_rows(tmp_path / "hf", [GOOD, GOOD, question, GOOD]))
    elif case == "missing-field":
        dataset["jsonl"] = str(_jsonl_rows(tmp_path / "d.jsonl", [GOOD], key="conversation"))
    else:
        dataset["jsonl"] = str(_jsonl_rows(tmp_path / "d.jsonl", list(toy.SAMPLE_CHATS)))
        dataset["tokenizer"] = str(tokenizer_dir)
    spec = {
        "teacher": {"hf": str(tiny_teacher_dir), "device": "cpu"},
        "dataset": dataset,
        "outputs": {"topk": 4},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    res = _run(job, tmp_path / "root")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {field}: ") and words in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "root").exists()
