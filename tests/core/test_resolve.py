"""Checking a spec against the files it names; content-addressed cache ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kdcache.core.errors import SpecError
from kdcache.core.resolve import resolve_job, uniform_layers
from kdcache.core.spec import parse_spec


def _spec(teacher: Path, tokens: Path, **outputs: object) -> dict:
    out = {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1]}
    out.update(outputs)
    return {
        "teacher": {"hf": str(teacher)},
        "dataset": {"tokens": str(tokens)},
        "outputs": out,
        "rows_per_shard": 4,
    }


def _problems(data: dict, base: Path | None = None) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        resolve_job(parse_spec(data), base)
    return {p.field: p.message for p in info.value.problems}


def test_resolves_counts_and_layers(tiny_teacher_dir: Path, tokens_npy: Path) -> None:
    plan = resolve_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy)))
    assert plan.num_rows == 8 and plan.seq_len == 16
    assert plan.teacher.vocab_size == 320 and plan.teacher.num_layers == 2
    assert plan.num_shards == 2
    assert plan.layers == [1]
    assert plan.tokenizer_fingerprint is not None  # the tiny teacher ships a tokenizer


def test_uniform_layers_map() -> None:
    assert uniform_layers(6, 12) == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12}
    assert uniform_layers(2, 2) == {1: 1, 2: 2}
    assert uniform_layers(3, 32) == {1: 11, 2: 21, 3: 32}


def test_uniform_resolves_against_teacher_depth(tiny_teacher_dir: Path, tokens_npy: Path) -> None:
    plan = resolve_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, hidden_layers="uniform:2")))
    assert plan.layer_map == {1: 1, 2: 2} and plan.layers == [1, 2]


def test_topk_and_layers_out_of_range(tiny_teacher_dir: Path, tokens_npy: Path) -> None:
    probs = _problems(_spec(tiny_teacher_dir, tokens_npy, topk=321, hidden_layers=[0, 3]))
    assert "320" in probs["outputs.topk"]
    assert "[3]" in probs["outputs.hidden_layers"]
    probs = _problems(_spec(tiny_teacher_dir, tokens_npy, hidden_layers="uniform:5"))
    assert "uniform:5" in probs["outputs.hidden_layers"]


def test_missing_teacher_and_dataset(tmp_path: Path, tokens_npy: Path) -> None:
    probs = _problems(_spec(tmp_path / "nope", tmp_path / "missing.npy"))
    assert "no such directory" in probs["teacher.hf"]
    assert "no such file" in probs["dataset.tokens"]
    (tmp_path / "empty").mkdir()
    probs = _problems(_spec(tmp_path / "empty", tokens_npy))
    assert "config.json" in probs["teacher.hf"]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.arange(10, dtype=np.int32), "2-D"),
        (np.zeros((3, 4), dtype=np.float32), "integers"),
        (np.zeros((3, 1), dtype=np.int32), ">= 2 tokens"),
    ],
)
def test_bad_token_arrays(
    tmp_path: Path, tiny_teacher_dir: Path, array: np.ndarray, message: str
) -> None:
    np.save(tmp_path / "t.npy", array)
    probs = _problems(_spec(tiny_teacher_dir, tmp_path / "t.npy"))
    assert message in probs["dataset.tokens"]


def test_not_an_npy_file(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    (tmp_path / "t.npy").write_text("hello")
    assert "dataset.tokens" in _problems(_spec(tiny_teacher_dir, tmp_path / "t.npy"))


def test_rows_longer_than_window(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    np.save(tmp_path / "long.npy", np.zeros((2, 129), dtype=np.int32))
    probs = _problems(_spec(tiny_teacher_dir, tmp_path / "long.npy"))
    assert "window of 128" in probs["dataset"]


def test_relative_paths_resolve_against_spec_dir(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    shutil.copy(tokens_npy, tmp_path / "tokens.npy")
    plan = resolve_job(parse_spec(_spec(tiny_teacher_dir, Path("tokens.npy"))), tmp_path)
    assert plan.spec.dataset.tokens == str(tmp_path / "tokens.npy")


def test_cache_id_is_content_addressed(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    a = resolve_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy))).cache_id
    moved_teacher = shutil.copytree(tiny_teacher_dir, tmp_path / "elsewhere")
    moved_tokens = shutil.copy(tokens_npy, tmp_path / "copy.npy")
    b = resolve_job(parse_spec(_spec(moved_teacher, Path(moved_tokens)))).cache_id
    assert a == b
    c = resolve_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, topk=9))).cache_id
    assert c != a
    data = np.load(tokens_npy)
    data[0, 0] = (data[0, 0] + 1) % 320
    np.save(tmp_path / "changed.npy", data)
    d = resolve_job(parse_spec(_spec(tiny_teacher_dir, tmp_path / "changed.npy"))).cache_id
    assert d != a
