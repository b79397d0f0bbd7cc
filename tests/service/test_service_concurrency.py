"""16 workers hammering POST /v1/leases on a real uvicorn and a SQLite file (or PostgreSQL)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from _svc import ADMIN_H, WORKER_H, make_settings, serve
from sqlalchemy import create_engine, text

from kdcache.service import create_app
from kdcache.worker import toy

N_SHARDS, N_WORKERS = 96, 16


def test_every_shard_is_leased_exactly_once(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    tokens = toy.make_tokens(tmp_path / "t.npy", N_SHARDS, 4, 320)
    spec = {
        "teacher": {"hf": str(tiny_teacher_dir)},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 2},
        "rows_per_shard": 1,
    }
    root = tmp_path / "root"
    leases: list[tuple[int, str]] = []
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(N_WORKERS)

    def worker(url: str, i: int) -> None:
        with httpx.Client(base_url=url, headers=WORKER_H, timeout=30) as c:
            start.wait(10)
            while True:
                r = c.post("/v1/leases", json={"worker": f"w{i}"})
                with lock:
                    statuses.append(r.status_code)
                if r.status_code != 200:
                    return
                with lock:
                    leases.append((r.json()["shard"], r.json()["id"]))

    settings = make_settings(root)
    with serve(create_app(settings)) as url:
        job = httpx.post(f"{url}/v1/jobs", json=spec, headers=ADMIN_H).json()
        assert job["shards_total"] == N_SHARDS
        threads = [threading.Thread(target=worker, args=(url, i)) for i in range(N_WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)

    assert set(statuses) == {200, 204}  # no 409/500/503 under contention
    shards = sorted(s for s, _ in leases)
    assert shards == list(range(N_SHARDS))  # each shard once: no duplicates, no gaps
    engine = create_engine(settings.db_url)
    with engine.connect() as con:
        owners = con.execute(
            text("SELECT shard, lease_id FROM shards WHERE job_id = :j"), {"j": job["id"]}
        )
        assert dict(owners.all()) == dict(leases)
        assert con.execute(text("SELECT COUNT(*) FROM leases")).scalar_one() == N_SHARDS
    engine.dispose()
