"""Document jobs through the service: a jsonl chat job and an hf job, two real worker processes,
each cache equal to the embedded run of the same spec."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Fleet, assert_same_cache, embedded_cache, new_fleet

from kdcache.core.prepared import prepared_url, read_prepared_meta
from kdcache.core.storage import open_storage
from kdcache.worker import toy

pytestmark = pytest.mark.integration


def _hf_chats(path: Path) -> Path:
    """A datasets.save_to_disk folder with a train and a test split of conversations."""
    import datasets

    chats = list(toy.SAMPLE_CHATS)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"conv": chats * 2}),
            "test": datasets.Dataset.from_dict({"conv": chats[:1]}),
        }
    ).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def specs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_teacher_dir: Path,
    chat_jsonl: Path,
    chat_tokenizer_dir: Path,
) -> dict[str, dict[str, Any]]:
    base = {
        "teacher": {"hf": str(tiny_teacher_dir), "device": "cpu"},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 2,
        "rows_per_shard": 2,
    }
    hf_dir = _hf_chats(tmp_path_factory.mktemp("hf") / "chats")
    return {
        "jsonl": {
            **base,
            "name": "chat-jsonl",
            "dataset": {
                "jsonl": str(chat_jsonl),
                "messages_field": "messages",
                "tokenizer": str(chat_tokenizer_dir),
                "seq_len": 40,
                "pack": False,
            },
        },
        "hf": {
            **base,
            "name": "chat-hf",
            "dataset": {
                "hf": str(hf_dir),
                "split": "train",
                "messages_field": "conv",
                "tokenizer": str(chat_tokenizer_dir),
                "seq_len": 24,
                "pack": True,
            },
        },
    }


@pytest.fixture(scope="module")
def done(
    tmp_path_factory: pytest.TempPathFactory,
    specs: dict[str, dict[str, Any]],
    slow_teacher_dir: Path,
) -> Iterator[tuple[Fleet, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]]:
    """Both jobs submitted, then finished by two workers: (fleet, submitted, final jobs)."""
    fleet = new_fleet(tmp_path_factory.mktemp("fleet-docs"), slow_teacher_dir).start()
    try:
        submitted = {k: fleet.submit(s) for k, s in specs.items()}
        workers = [fleet.worker(max_idle=3.0), fleet.worker(max_idle=3.0)]
        final = {k: fleet.wait_job(j["id"], timeout=180) for k, j in submitted.items()}
        for w in workers:
            assert fleet.wait_exit(w, timeout=60) == 0, fleet.log_of(w)
        yield fleet, submitted, final
    finally:
        fleet.close()


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_the_fleet_makes_the_embedded_cache(
    done: tuple[Fleet, dict[str, dict[str, Any]], dict[str, dict[str, Any]]],
    specs: dict[str, dict[str, Any]],
    kind: str,
    tmp_path: Path,
) -> None:
    fleet, submitted, final = done
    before, after = submitted[kind], final[kind]
    assert (before["rows_total"], before["shards_total"]) == (None, None)
    assert after["status"] == "done", after["error"]
    served = str(fleet.root / "caches" / after["cache_id"])
    want = embedded_cache(specs[kind], tmp_path / "embedded")
    assert_same_cache(served, want)
    meta = read_prepared_meta(open_storage(prepared_url(served)))
    assert not Path(served, "_kdcache", "prepared").exists()  # the cache group holds no extras
    assert meta is not None and meta.num_rows == after["rows_total"]
    assert after["shards_total"] == after["shards_done"] == -(-meta.num_rows // 2)
    assert after["rows_done"] == meta.num_rows
    if kind == "jsonl":
        assert meta.num_rows == len(toy.SAMPLE_CHATS)  # one padded row per conversation
