"""Document (jsonl) jobs: a prepare lease first, then shards; progress before and after; 422s."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _svc import ADMIN_H, WORKER_H, claim, make_settings
from fastapi.testclient import TestClient

from kdcache.core.prepared import PREPARED_META, PreparedRows, prepared_url, read_prepared_meta
from kdcache.core.spec import parse_spec
from kdcache.core.storage import open_storage
from kdcache.service import Settings
from kdcache.worker.datasets import open_source
from kdcache.worker.prepare import prepare_documents


@pytest.fixture
def doc_spec(spec: dict[str, Any], docs_jsonl: Path) -> dict[str, Any]:
    """The toy documents packed into rows of 8 tokens, 2 rows per shard."""
    return {**spec, "dataset": {"jsonl": str(docs_jsonl), "seq_len": 8}}


def _prepare(lease: dict[str, Any]) -> int:
    meta = prepare_documents(
        parse_spec(lease["spec"]), open_storage(prepared_url(lease["cache_url"])), lease["cache_id"]
    )
    assert meta is not None
    return meta.num_rows


def test_a_jsonl_job_is_prepared_then_split_into_shards(
    client: TestClient, doc_spec: dict[str, Any]
) -> None:
    r = client.post("/v1/jobs", json=doc_spec, headers=ADMIN_H)
    assert r.status_code == 201, r.text
    job = r.json()
    # rows are unknown until the text is tokenised
    assert (job["status"], job["shards_total"], job["rows_total"]) == ("pending", None, None)
    assert (job["shards_done"], job["rows_done"]) == (0, 0)
    lease = claim(client).json()
    assert (lease["kind"], lease["shard"], lease["start"], lease["end"]) == ("prepare", -1, 0, 0)
    assert claim(client, "other").status_code == 204  # nothing else until it is prepared
    running = client.get(f"/v1/jobs/{job['id']}").json()
    assert (running["status"], running["shards_total"], running["shards_done"]) == (
        "running",
        None,
        0,
    )
    # completing before the rows are stored is refused: the service reads meta.json itself
    early = client.post(
        f"/v1/leases/{lease['id']}/complete",
        json={"prepared": {"num_rows": 3, "seq_len": 8}},
        headers=WORKER_H,
    )
    assert early.status_code == 422 and early.json()["error"]["field"] == "prepared"
    n = _prepare(lease)
    want = open_source(parse_spec(lease["spec"]).dataset)
    assert n == want.num_rows and n >= 3
    wrong = client.post(
        f"/v1/leases/{lease['id']}/complete",
        json={"prepared": {"num_rows": n + 1, "seq_len": 8}},
        headers=WORKER_H,
    )
    assert wrong.status_code == 422
    done = client.post(
        f"/v1/leases/{lease['id']}/complete",
        json={"prepared": {"num_rows": n, "seq_len": 8}},
        headers=WORKER_H,
    )
    assert done.status_code == 200, done.text
    after = done.json()
    assert (after["rows_total"], after["shards_total"]) == (n, -(-n // 2))
    assert (after["shards_done"], after["rows_done"], after["status"]) == (0, 0, "running")
    # the same answer again (a lost reply) is not an error
    again = client.post(
        f"/v1/leases/{lease['id']}/complete",
        json={"prepared": {"num_rows": n, "seq_len": 8}},
        headers=WORKER_H,
    )
    assert again.status_code == 200 and again.json()["shards_total"] == after["shards_total"]
    first = claim(client).json()
    assert (first["kind"], first["shard"], first["start"], first["end"]) == ("shard", 0, 0, 2)
    rows = PreparedRows(open_storage(prepared_url(lease["cache_url"])))
    assert (rows.rows(0, n) == want.rows(0, n)).all()
    assert (rows.loss_mask(0, n) == want.loss_mask(0, n)).all()
    cache = client.get(f"/v1/caches/{job['cache_id']}")
    assert cache.status_code == 200 and cache.json()["complete"] is False


def test_a_resubmitted_job_reuses_the_prepared_rows(
    client: TestClient, doc_spec: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json=doc_spec, headers=ADMIN_H).json()
    lease = claim(client).json()
    n = _prepare(lease)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN_H)
    again = client.post("/v1/jobs", json=doc_spec, headers=ADMIN_H)
    assert again.status_code == 201 and again.json()["id"] != job["id"]
    assert again.json()["rows_total"] == n  # known at submit: no second prepare step
    assert claim(client).json()["kind"] == "shard"


def test_a_killed_preparer_leaves_nothing_trusted(
    make_client: Callable[[Settings], TestClient], tmp_path: Path, doc_spec: dict[str, Any]
) -> None:
    c = make_client(make_settings(tmp_path / "root", lease_seconds=0.5))
    job = c.post("/v1/jobs", json=doc_spec, headers=ADMIN_H).json()
    lease = claim(c, "dies").json()
    storage = open_storage(prepared_url(lease["cache_url"]))
    # a preparer killed after some shard objects but before meta.json
    stopped = prepare_documents(
        parse_spec(lease["spec"]),
        storage,
        lease["cache_id"],
        should_stop=itertools.chain([False], itertools.repeat(True)).__next__,
    )
    assert stopped is None and not storage.exists(PREPARED_META)
    assert storage.list("shards"), "one shard object was written"
    assert read_prepared_meta(storage) is None
    time.sleep(0.7)
    retry = claim(c, "lives").json()
    assert (retry["kind"], retry["attempt"]) == ("prepare", 2)
    n = _prepare(retry)
    late = c.post(
        f"/v1/leases/{lease['id']}/complete",
        json={"prepared": {"num_rows": n, "seq_len": 8}},
        headers=WORKER_H,
    )
    assert late.status_code == 409  # the dead worker's lease lost its unit of work
    ok = c.post(
        f"/v1/leases/{retry['id']}/complete",
        json={"prepared": {"num_rows": n, "seq_len": 8}},
        headers=WORKER_H,
    )
    assert ok.status_code == 200 and ok.json()["rows_total"] == n
    assert c.get(f"/v1/jobs/{job['id']}").json()["shards_total"] == -(-n // 2)


def test_a_failed_prepare_fails_the_job_with_its_message(
    client: TestClient, doc_spec: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json=doc_spec, headers=ADMIN_H).json()
    lease = claim(client).json()
    msg = "dataset.text_field: docs.jsonl line 7: no field 'text'"
    r = client.post(
        f"/v1/leases/{lease['id']}/fail",
        json={"message": msg, "retryable": False},
        headers=WORKER_H,
    )
    assert r.status_code == 200
    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"] == f"prepare: {msg}"


def _chat_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("rows", "field", "words"),
    [
        ([GOOD, [{"role": "robot", "content": "x"}, *GOOD]], "dataset.messages_field", "line 2"),
        (
            [GOOD, [{"role": "user", "content": "only a question"}]],
            "dataset.messages_field",
            "no assistant turn",
        ),
        ([GOOD, {"no": "list"}], "dataset.messages_field", "line 2"),
    ],
)
def test_bad_conversations_are_422_at_submit(
    client: TestClient,
    spec: dict[str, Any],
    tmp_path: Path,
    chat_tokenizer_dir: Path,
    rows: list[Any],
    field: str,
    words: str,
) -> None:
    docs = _chat_jsonl(tmp_path / "chat.jsonl", rows)
    body = {
        **spec,
        "dataset": {
            "jsonl": str(docs),
            "messages_field": "messages",
            "tokenizer": str(chat_tokenizer_dir),
            "seq_len": 16,
        },
    }
    r = client.post("/v1/jobs", json=body, headers=ADMIN_H)
    assert r.status_code == 422, r.text
    problems = r.json()["error"]["problems"]
    assert [p["field"] for p in problems] == [field]
    assert words in problems[0]["message"] and str(docs) in problems[0]["message"]
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_a_tokenizer_without_a_chat_template_is_422(
    client: TestClient, spec: dict[str, Any], tmp_path: Path, tokenizer_dir: Path
) -> None:
    docs = _chat_jsonl(tmp_path / "chat.jsonl", [GOOD])
    body = {
        **spec,
        "dataset": {
            "jsonl": str(docs),
            "messages_field": "messages",
            "tokenizer": str(tokenizer_dir),
            "seq_len": 16,
        },
    }
    r = client.post("/v1/jobs", json=body, headers=ADMIN_H)
    assert r.status_code == 422
    (problem,) = r.json()["error"]["problems"]
    assert problem["field"] == "dataset.messages_field" and "no chat template" in problem["message"]
