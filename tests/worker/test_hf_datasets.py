"""Hugging Face datasets from local files: every form gives the rows JSON lines give; splits,
max_rows, errors; the dataset fingerprint covers what decides the tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from kdcache.core.errors import DatasetError, SpecError
from kdcache.core.resolve import resolve_job
from kdcache.core.spec import DatasetSpec, parse_spec
from kdcache.worker import toy
from kdcache.worker.datasets import HFSource, JsonlSource, open_checked

TEXTS = list(toy.SAMPLE_TEXTS)


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sample texts as every kind of local HF dataset (plus a held-out "test" split)."""
    base = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    out = {"disk": base / "disk", "dict": base / "dict", "parquet": base / "t.parquet"}
    ds.save_to_disk(str(out["disk"]))
    test = datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(out["dict"]))
    ds.to_parquet(str(out["parquet"]))
    out["json"] = base / "t.jsonl"
    ds.to_json(str(out["json"]))
    out["folder"] = base / "folder"
    out["folder"].mkdir()
    ds.select(range(4)).to_parquet(str(out["folder"] / "part-0.parquet"))
    ds.select(range(4, len(TEXTS))).to_parquet(str(out["folder"] / "part-1.parquet"))
    arrow = next((out["disk"]).glob("*.arrow"))
    out["arrow"] = base / "t.arrow"
    shutil.copy(arrow, out["arrow"])
    return out


@pytest.mark.parametrize("form", ["disk", "dict", "parquet", "json", "folder", "arrow"])
@pytest.mark.parametrize("pack", [True, False])
def test_every_form_gives_the_jsonl_rows(
    forms: dict[str, Path], docs_jsonl: Path, tokenizer_dir: Path, form: str, pack: bool
) -> None:
    want = JsonlSource(docs_jsonl, tokenizer_path=tokenizer_dir, seq_len=8, pack=pack)
    got = HFSource(forms[form], tokenizer_path=tokenizer_dir, seq_len=8, pack=pack)
    assert got.num_rows == want.num_rows
    np.testing.assert_array_equal(got.rows(0, got.num_rows), want.rows(0, want.num_rows))
    np.testing.assert_array_equal(got.loss_mask(0, got.num_rows), want.loss_mask(0, want.num_rows))


def test_split_and_max_rows(forms: dict[str, Path], tokenizer_dir: Path) -> None:
    test = HFSource(
        forms["dict"], tokenizer_path=tokenizer_dir, seq_len=8, split="test", pack=False
    )
    assert test.num_rows == 1
    first3 = HFSource(
        forms["disk"], tokenizer_path=tokenizer_dir, seq_len=8, pack=False, max_rows=3
    )
    full = HFSource(forms["disk"], tokenizer_path=tokenizer_dir, seq_len=8, pack=False)
    assert first3.num_rows == 3
    np.testing.assert_array_equal(first3.rows(0, 3), full.rows(0, 3))
    with pytest.raises(
        DatasetError, match=r"has no split 'valid' \(it has \['test', 'train'\]\)"
    ) as err:
        HFSource(forms["dict"], tokenizer_path=tokenizer_dir, seq_len=8, split="valid")
    assert err.value.field == "dataset.split"


def test_conversations_from_a_dataset(
    tmp_path: Path, chat_jsonl: Path, chat_tokenizer_dir: Path
) -> None:
    path = tmp_path / "chats"
    datasets.Dataset.from_dict({"messages": list(toy.SAMPLE_CHATS)}).save_to_disk(str(path))
    kw: dict[str, Any] = {"tokenizer_path": chat_tokenizer_dir, "seq_len": 40, "pack": False}
    got = HFSource(path, messages_field="messages", **kw)
    want = JsonlSource(chat_jsonl, messages_field="messages", **kw)
    np.testing.assert_array_equal(got.rows(0, 5), want.rows(0, 5))
    np.testing.assert_array_equal(got.loss_mask(0, 5), want.loss_mask(0, 5))


def test_bad_hf_input_names_field_and_row(
    tmp_path: Path, forms: dict[str, Path], tokenizer_dir: Path
) -> None:
    def spec(**kw: Any) -> DatasetSpec:
        return DatasetSpec(tokenizer=str(tokenizer_dir), seq_len=8, **kw)

    no_body = r"dataset.text_field: .*has no field 'body' \(its columns are \['text', 'n'\]\)"
    with pytest.raises(SpecError, match=no_body):
        open_checked(spec(hf=str(forms["disk"]), text_field="body"))
    with pytest.raises(
        SpecError, match=r"dataset.text_field: .* row 0: field 'n' must be a string"
    ):
        open_checked(spec(hf=str(forms["disk"]), text_field="n"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(SpecError, match="dataset.hf: .*neither a datasets.save_to_disk folder"):
        open_checked(spec(hf=str(empty)))


def _fp(teacher: Path, **dataset: Any) -> str:
    body = {"teacher": {"hf": str(teacher)}, "dataset": {"seq_len": 8, **dataset}}
    return resolve_job(parse_spec(body)).dataset_fingerprint


def test_fingerprint_covers_what_decides_the_tokens(
    tmp_path: Path,
    forms: dict[str, Path],
    tiny_teacher_dir: Path,
    chat_tokenizer_dir: Path,
    chat_tokenizer_plain_dir: Path,
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(forms["folder"], folder)
    base = _fp(tiny_teacher_dir, hf=str(folder))
    assert base == _fp(tiny_teacher_dir, hf=str(folder))
    variants = {
        "split": _fp(tiny_teacher_dir, hf=str(folder), split="test"),
        "max_rows": _fp(tiny_teacher_dir, hf=str(folder), max_rows=3),
        "seq_len": _fp(tiny_teacher_dir, hf=str(folder), seq_len=9),
        "pack": _fp(tiny_teacher_dir, hf=str(folder), pack=False),
        "field": _fp(tiny_teacher_dir, hf=str(folder), text_field="n"),
        "tokenizer": _fp(tiny_teacher_dir, hf=str(folder), tokenizer=str(chat_tokenizer_dir)),
    }
    assert len({base, *variants.values()}) == len(variants) + 1
    ds = datasets.Dataset.from_dict({"text": ["changed"]})
    ds.to_parquet(str(folder / "part-1.parquet"))
    assert _fp(tiny_teacher_dir, hf=str(folder)) != base  # file bytes
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps({"messages": toy.SAMPLE_CHATS[1]}) + "\n")
    # the same tokenizer with another chat template: other tokens, another fingerprint
    a = _fp(
        tiny_teacher_dir,
        jsonl=str(chats),
        messages_field="messages",
        tokenizer=str(chat_tokenizer_dir),
    )
    b = _fp(
        tiny_teacher_dir,
        jsonl=str(chats),
        messages_field="messages",
        tokenizer=str(chat_tokenizer_plain_dir),
    )
    assert a != b
