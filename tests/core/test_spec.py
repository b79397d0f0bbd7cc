"""The job spec's shape: every invalid field is named, all problems are reported together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcache.core.errors import SpecError
from kdcache.core.spec import JobSpec, load_spec, parse_spec

VALID = {
    "name": "t",
    "teacher": {"hf": "/models/teacher"},
    "dataset": {"tokens": "/data/tokens.npy"},
    "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1, 2]},
    "batch_size": 4,
    "rows_per_shard": 16,
}


def _with(path: str, value: object) -> dict:
    data = json.loads(json.dumps(VALID))
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return data


def test_valid_spec_parses_with_defaults() -> None:
    spec = parse_spec({"teacher": {"hf": "x"}, "dataset": {"tokens": "y"}})
    assert isinstance(spec, JobSpec)
    assert spec.outputs.topk == 64
    assert spec.outputs.temperatures == [1.0]
    assert spec.teacher.dtype == "auto" and spec.teacher.device == "auto"
    assert spec.rows_per_shard == 256 and spec.batch_size == 8


def test_temperature_one_is_always_cached() -> None:
    spec = parse_spec(_with("outputs.temperatures", [2.0, 4.0]))
    assert spec.outputs.temperatures == [1.0, 2.0, 4.0]
    spec = parse_spec(_with("outputs.temperatures", [2.0, 1.0]))
    assert spec.outputs.temperatures == [2.0, 1.0]


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("teacher.dtype", "fp8", "teacher.dtype"),
        ("teacher.device", "gpu0", "teacher.device"),
        ("teacher.module", "not a module", "teacher.module"),
        ("outputs.topk", -1, "outputs.topk"),
        ("outputs.temperatures", [0.0], "outputs.temperatures"),
        ("outputs.temperatures", [2.0, 2.0], "outputs.temperatures"),
        ("outputs.hidden_layers", "uniform:0", "outputs.hidden_layers"),
        ("outputs.hidden_layers", [-1], "outputs.hidden_layers"),
        ("outputs.hidden_dtype", "int8", "outputs.hidden_dtype"),
        ("rows_per_shard", 0, "rows_per_shard"),
        ("batch_size", 0, "batch_size"),
        ("bogus", 1, "bogus"),
        # pydantic reads true as 1: a boolean where a number goes is refused
        ("outputs.topk", True, "outputs.topk"),
        ("outputs.hidden_layers", [True, 2], "outputs.hidden_layers"),
        ("outputs.temperatures", [False], "outputs.temperatures"),
        ("rows_per_shard", True, "rows_per_shard"),
        ("generate", {"max_new_tokens": True}, "generate.max_new_tokens"),
    ],
)
def test_each_invalid_field_is_named(path: str, value: object, field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with(path, value))
    fields = [p.field for p in info.value.problems]
    assert field in fields, fields


def test_booleans_still_go_where_a_boolean_goes() -> None:
    spec = parse_spec(_with("outputs.sample_logprobs", True))
    assert spec.outputs.sample_logprobs is True


def test_teacher_needs_exactly_one_source() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with("teacher", {"dtype": "auto"}))
    assert [p.field for p in info.value.problems] == ["teacher"]
    with pytest.raises(SpecError):
        parse_spec(_with("teacher", {"hf": "a", "module": "m:f"}))


def test_jsonl_needs_seq_len() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with("dataset", {"jsonl": "d.jsonl"}))
    assert "seq_len" in str(info.value)


@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        ({"hf": "/d"}, "'seq_len' is required with 'hf'"),
        ({"tokens": "/t.npy", "jsonl": "/d.jsonl", "seq_len": 8}, "exactly one of"),
        ({"tokens": "/t.npy", "messages_field": "m"}, "only apply to 'jsonl' or 'hf'"),
        ({"jsonl": "/d.jsonl", "seq_len": 8, "split": "train"}, "'split' only applies to 'hf'"),
        (
            {"hf": "/d", "seq_len": 8, "text_field": "t", "messages_field": "m"},
            "not both",
        ),
        ({"hf": "/d", "seq_len": 8, "max_rows": 0}, "greater than or equal to 1"),
    ],
)
def test_document_dataset_rules(dataset: dict, words: str) -> None:
    with pytest.raises(SpecError, match=words) as info:
        parse_spec(_with("dataset", dataset))
    assert all(p.field.startswith("dataset") for p in info.value.problems)


def test_document_dataset_fields() -> None:
    spec = parse_spec(
        _with(
            "dataset",
            {"hf": "/d", "messages_field": "m", "split": "test", "max_rows": 5, "seq_len": 8},
        )
    )
    ds = spec.dataset
    assert (ds.documents, ds.messages_field, ds.split, ds.max_rows, ds.pack) == (
        "/d",
        "m",
        "test",
        5,
        True,
    )
    assert parse_spec(_with("dataset", {"jsonl": "/d.jsonl", "seq_len": 8})).dataset.documents
    # the spec travels as JSON (REST job views, leases): it must parse again
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert ds.field == "m" and parse_spec(VALID).dataset.field == "text"


def test_all_problems_reported_together() -> None:
    bad = _with("rows_per_shard", 0)
    bad["outputs"]["topk"] = -3
    bad["teacher"]["dtype"] = "fp8"
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    assert {p.field for p in info.value.problems} == {
        "rows_per_shard",
        "outputs.topk",
        "teacher.dtype",
    }


def test_nothing_to_keep_is_an_error() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with("outputs", {"topk": 0}))
    assert "nothing to keep" in str(info.value)


def test_load_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps(VALID))
    (tmp_path / "job.yaml").write_text(
        "teacher: {hf: /models/teacher}\ndataset: {tokens: /data/tokens.npy}\n"
        "outputs: {topk: 8, temperatures: [1.0, 2.0], hidden_layers: [1, 2]}\n"
        "name: t\nbatch_size: 4\nrows_per_shard: 16\n"
    )
    assert load_spec(tmp_path / "job.json") == load_spec(tmp_path / "job.yaml")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "list.yaml")
