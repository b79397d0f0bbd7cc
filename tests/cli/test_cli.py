"""The ``kdcache`` CLI: run, inspect, verify; bad input gives one line per problem and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def kdcache(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(cwd or ".")},
    )


def _job(tmp: Path, teacher: Path, tokens: Path, **over: object) -> Path:
    spec: dict = {
        "name": "cli",
        "teacher": {"hf": str(teacher)},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 4, "temperatures": [1.0, 2.0], "hidden_layers": "uniform:2"},
        "batch_size": 4,
        "rows_per_shard": 3,
    }
    for key, value in over.items():
        node = spec
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def cache(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    res = kdcache("run", str(_job(tmp, tiny_teacher_dir, tokens_npy)), "--root", str(tmp / "root"))
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.parent == tmp / "root" / "caches" and path.is_dir()
    return path


def test_run_prints_progress_and_cache_path(cache: Path) -> None:
    assert (cache / "zarr.json").is_file()
    assert len(list((cache / "_kdcache" / "shards").glob("*.json"))) == 3  # 8 rows / 3 per shard


def test_inspect(cache: Path) -> None:
    res = kdcache("inspect", str(cache))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "8 x 16 tokens = 128 tokens" in out
    assert "3/3 complete" in out
    assert "hidden/2" in out and "bfloat16 (as uint16)" in out
    assert "bytes/token" in out
    info = json.loads(kdcache("inspect", str(cache), "--json").stdout)
    assert info["complete"] is True and info["tokens"] == 128
    assert {a["name"] for a in info["arrays"]} == {
        "input_ids",
        "loss_mask",
        "topk/logprobs",
        "topk/indices",
        "topk/logsumexp",
        "hidden/1",
        "hidden/2",
    }
    on_disk = sum(
        p.stat().st_size for p in cache.rglob("*") if p.is_file() and "/c/" in p.as_posix()
    )
    assert info["bytes"] == on_disk
    assert info["bytes_per_token"] == pytest.approx(on_disk / 128)


def test_verify_ok_then_corrupt(cache: Path, tmp_path: Path) -> None:
    res = kdcache("verify", str(cache))
    assert res.returncode == 0 and "3/3 completed shards verified ok" in res.stdout
    import shutil

    copy = Path(shutil.copytree(cache, tmp_path / "copy"))
    target = copy / "topk" / "logsumexp" / "c" / "1" / "0" / "0"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    target.write_bytes(bytes(raw))
    res = kdcache("verify", str(copy))
    assert res.returncode == 1
    assert "shard 1: CORRUPT" in res.stdout and "topk/logsumexp" in res.stdout
    assert "shard 0" not in res.stdout and "2/3 completed shards verified ok" in res.stdout


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"teacher__hf": "/nonexistent/teacher"}, "teacher.hf"),
        ({"outputs__topk": 100000}, "outputs.topk"),
        ({"outputs__hidden_layers": [9]}, "outputs.hidden_layers"),
        ({"teacher__dtype": "float8"}, "teacher.dtype"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
        ({"dataset__tokens": "/nonexistent/tokens.npy"}, "dataset.tokens"),
    ],
)
def test_bad_spec_exit_2_one_line_per_problem(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path, override: dict, field: str
) -> None:
    job = _job(tmp_path, tiny_teacher_dir, tokens_npy, **override)
    res = kdcache("run", str(job), "--root", str(tmp_path / "root"))
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "root").exists()


def test_several_problems_at_once(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    import numpy as np

    np.save(tmp_path / "floats.npy", np.zeros((4, 8), dtype=np.float32))
    job = _job(
        tmp_path,
        tiny_teacher_dir,
        tmp_path / "floats.npy",
        outputs__topk=1000,
        outputs__hidden_layers=[7],
    )
    res = kdcache("run", str(job), "--root", str(tmp_path / "root"))
    assert res.returncode == 2
    fields = sorted(
        line.split(":")[1].strip() for line in res.stderr.splitlines() if line.startswith("error:")
    )
    assert fields == ["dataset.tokens", "outputs.hidden_layers", "outputs.topk"]
    assert not (tmp_path / "root").exists()


def test_bad_data_fails_naming_row(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    import numpy as np

    ids = np.load(tokens_npy)
    ids[4, 0] = 99999
    np.save(tmp_path / "bad.npy", ids)
    res = kdcache(
        "run",
        str(_job(tmp_path, tiny_teacher_dir, tmp_path / "bad.npy")),
        "--root",
        str(tmp_path / "r"),
    )
    assert res.returncode == 1
    assert "row 4" in res.stderr and "99999" in res.stderr and "Traceback" not in res.stderr


def test_inspect_missing_cache(tmp_path: Path) -> None:
    res = kdcache("inspect", str(tmp_path / "nothing"))
    assert res.returncode == 1 and "no kdcache cache" in res.stderr


def test_shape_and_file_problems_reported_together(tmp_path: Path, tokens_npy: Path) -> None:
    job = _job(tmp_path, tmp_path / "no-teacher", tokens_npy, teacher__dtype="fp8", batch_size=0)
    res = kdcache("run", str(job), "--root", str(tmp_path / "root"))
    assert res.returncode == 2
    fields = sorted(
        line.split(":")[1].strip() for line in res.stderr.splitlines() if line.startswith("error:")
    )
    assert fields == ["batch_size", "teacher.dtype", "teacher.hf"]
