"""``kdcache submit | jobs | worker`` against a real service."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_helpers import Fleet, fleet_env, free_port

pytestmark = pytest.mark.integration


def _write_job(folder: Path, teacher: Path, tokens: Path, **outputs: object) -> Path:
    """A job file whose dataset path is relative to the file's folder."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(tokens, folder / "data" / "tokens.npy")
    spec = {
        "name": "cli-job",
        "teacher": {"hf": str(teacher), "device": "cpu"},
        "dataset": {"tokens": "data/tokens.npy"},
        "outputs": {"topk": 4, "hidden_layers": [2], **outputs},
        "rows_per_shard": 4,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_wait_and_jobs(
    fleet: Fleet, tiny_teacher_dir: Path, tokens_npy: Path, tmp_path: Path
) -> None:
    job_file = _write_job(tmp_path / "spec", tiny_teacher_dir, tokens_npy)
    worker = fleet.worker(max_idle=20)
    # from another folder: the relative dataset path must be taken from the job file's folder
    res = fleet.cli("submit", str(job_file), "--server", fleet.url, "--wait", "--poll", "0.2")
    assert res.returncode == 0, res.stderr + res.stdout + fleet.log_of(worker)
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("submitted job "), res.stdout
    assert any("rows" in ln and "tokens/s" in ln and "ETA" in ln for ln in lines), res.stdout
    assert any("done, 8/8 rows" in ln for ln in lines), res.stdout
    cache_id = lines[0].split(" for cache ")[1].split()[0]
    assert lines[-1] == f"{fleet.url}/v1/caches/{cache_id}"
    job_id = lines[0].split()[2]

    listing = fleet.cli("jobs", "--server", fleet.url)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.strip().splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATUS"]
    mine = [r for r in rows if r.startswith(job_id)]
    assert len(mine) == 1 and " done " in mine[0] and "2/2" in mine[0] and cache_id in mine[0]
    only_failed = fleet.cli("jobs", "--server", fleet.url, "--status", "failed")
    assert job_id not in only_failed.stdout

    again = fleet.cli("submit", str(job_file), "--server", fleet.url)
    assert again.returncode == 0 and f"job {job_id}" in again.stdout, again.stdout


def test_submit_bad_spec_exits_2_naming_the_field(
    fleet: Fleet, tiny_teacher_dir: Path, tokens_npy: Path, tmp_path: Path
) -> None:
    job_file = _write_job(tmp_path, tiny_teacher_dir, tokens_npy, topk=100_000)
    res = fleet.cli("submit", str(job_file), "--server", fleet.url)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "outputs.topk" in res.stderr and "Traceback" not in res.stderr, res.stderr

    (tmp_path / "data" / "tokens.npy").unlink()
    res = fleet.cli("submit", str(job_file), "--server", fleet.url)
    assert res.returncode == 2 and "dataset.tokens" in res.stderr, res.stderr


def test_jobs_needs_a_reachable_server(slow_teacher_dir: Path) -> None:
    env = fleet_env(slow_teacher_dir)  # no KDCACHE_SERVER in it

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "kdcache.cli", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    res = cli("jobs")
    assert res.returncode == 2 and "KDCACHE_SERVER" in res.stderr, res.stderr
    res = cli("jobs", "--server", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert res.returncode == 1 and res.stderr.startswith("error: "), res.stderr
