"""A sequence-level KD job through the service: a jsonl prompt job (prepare lease, then shard
leases that generate) and a token prompt job, two real worker processes, each cache equal to the
embedded run of the same spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import Fleet, assert_same_cache, embedded_cache, new_fleet

from kdcache.core.reader import CacheReader
from kdcache.worker import toy

pytestmark = pytest.mark.integration

NEW = 5


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("prompts")
    (data / "prompts.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in toy.SAMPLE_TEXTS)
    )
    toy.make_tokens(data / "prompts.npy", 6, 5, 320, seed=3)
    base = {
        "teacher": {"hf": str(tiny_teacher_dir), "device": "cpu"},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 2,
        "rows_per_shard": 3,
    }
    return {
        "jsonl": {
            **base,
            "name": "seqkd-jsonl",
            "dataset": {"jsonl": str(data / "prompts.jsonl"), "seq_len": 10, "pack": False},
            "generate": {"max_new_tokens": NEW, "do_sample": True, "top_p": 0.9, "seed": 5},
        },
        "tokens": {
            **base,
            "name": "seqkd-tokens",
            "dataset": {"tokens": str(data / "prompts.npy")},
            "generate": {"max_new_tokens": NEW},
        },
    }


@pytest.fixture(scope="module")
def done(
    tmp_path_factory: pytest.TempPathFactory, specs: dict[str, Any], slow_teacher_dir: Path
) -> Iterator[tuple[Fleet, dict[str, dict[str, Any]]]]:
    # one thread per process: tiny models on shared cores only contend with a second one
    base = tmp_path_factory.mktemp("fleet-gen")
    fleet = new_fleet(base, slow_teacher_dir, env={"OMP_NUM_THREADS": "1"}).start()
    try:
        submitted = {k: fleet.submit(s) for k, s in specs.items()}
        workers = [fleet.worker(max_idle=3.0), fleet.worker(max_idle=3.0)]
        final = {k: fleet.wait_job(j["id"], timeout=240) for k, j in submitted.items()}
        for w in workers:
            assert fleet.wait_exit(w, timeout=60) == 0, fleet.log_of(w)
        yield fleet, final
    finally:
        fleet.close()


@pytest.mark.parametrize("kind", ["jsonl", "tokens"])
def test_the_fleet_generates_the_embedded_cache(
    done: tuple[Fleet, dict[str, dict[str, Any]]],
    specs: dict[str, Any],
    kind: str,
    tmp_path: Path,
) -> None:
    fleet, final = done
    job = final[kind]
    assert job["status"] == "done", job["error"]
    served = str(fleet.root / "caches" / job["cache_id"])
    want = embedded_cache(specs[kind], tmp_path / "embedded", threads=1)  # as the workers
    assert_same_cache(served, want)
    reader = CacheReader(served)
    mask = reader.read("loss_mask", slice(None))
    prompt_len = 10 if kind == "jsonl" else 5
    assert reader.manifest.seq_len == prompt_len + NEW
    assert 0 < mask.sum(axis=1).max() <= NEW and mask.sum(axis=1).min() >= 1
    if kind == "tokens":  # whole rows are prompts: position 4 predicts the first new token
        assert mask[:, 4].all() and not mask[:, :4].any()
        prompts = np.load(specs[kind]["dataset"]["tokens"])
        np.testing.assert_array_equal(reader.read("input_ids", slice(None))[:, :5], prompts)
