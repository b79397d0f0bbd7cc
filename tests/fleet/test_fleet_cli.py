"""``kdcache submit | jobs | worker`` against a real service."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import yaml
from _net import free_port
from fleet_helpers import Fleet

from kdcache.cli.main import main
from kdcache.cli.service_commands import wait_for_job
from kdcache.client import CacheClient

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
    fleet: Fleet,
    tiny_teacher_dir: Path,
    tokens_npy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
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

    capsys.readouterr()
    assert main(["jobs", "--server", fleet.url]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATUS"]
    mine = [r for r in rows if r.startswith(job_id)]
    assert len(mine) == 1 and " done " in mine[0] and "2/2" in mine[0] and cache_id in mine[0]
    assert main(["jobs", "--server", fleet.url, "--status", "failed"]) == 0
    assert job_id not in capsys.readouterr().out

    assert main(["submit", str(job_file), "--server", fleet.url]) == 0  # the same cache again
    again = capsys.readouterr().out
    assert f"job {job_id}" in again and again.strip().endswith(cache_id), again


def test_submit_and_slurm_wait_say_the_same(
    fleet: Fleet,
    tiny_teacher_dir: Path,
    tokens_npy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``submit --wait`` and ``slurm --wait`` follow a job through one helper, ``wait_for_job``:
    the same line when they give up, and when the job ends other than done."""
    job_file = _write_job(tmp_path / "spec", tiny_teacher_dir, tokens_npy)
    wait = ["--wait", "--timeout", "0.3", "--poll", "0.1"]
    # no worker runs, so the job stays pending and the wait times out
    assert main(["submit", str(job_file), "--server", fleet.url, *wait]) == 1
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0].split()[2]
    timeout_line = f"error: timeout: job {job_id} still pending after 0.3s"
    assert err.strip() == timeout_line, err
    assert fleet.cache_url("") not in out  # no cache URL for a job that is not done

    sbatch = tmp_path / "sbatch"  # stands in for Slurm's: takes the script, prints a job id
    sbatch.write_text("#!/bin/sh\ncat >/dev/null\necho 4242\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    slurm = ["slurm", "--job", job_id, "--server", fleet.url, "--gpus", "1", "--cpu"]
    slurm += ["--sbatch-bin", str(sbatch), "--log-dir", str(tmp_path / "logs"), *wait]
    assert main(slurm) == 1
    out, err = capsys.readouterr()
    assert "submitted Slurm array 4242" in out and err.strip() == timeout_line, out + err

    assert main(["cancel", job_id, "--server", fleet.url]) == 0
    capsys.readouterr()
    with CacheClient(fleet.url) as client:
        assert wait_for_job(client, job_id, timeout=30, poll=0.1) is False
    assert capsys.readouterr().err.strip() == "error: job_cancelled: no error message"


def test_submit_bad_spec_exits_2_naming_the_field(
    fleet: Fleet,
    tiny_teacher_dir: Path,
    tokens_npy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_file = _write_job(tmp_path, tiny_teacher_dir, tokens_npy, topk=100_000)
    assert main(["submit", str(job_file), "--server", fleet.url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: outputs.topk: ") and "Traceback" not in err, err

    (tmp_path / "data" / "tokens.npy").unlink()
    assert main(["submit", str(job_file), "--server", fleet.url]) == 2
    assert "error: dataset.tokens: " in capsys.readouterr().err


def test_commands_need_a_reachable_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KDCACHE_SERVER", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["jobs"])
    assert exit_info.value.code == 2
    assert "KDCACHE_SERVER" in capsys.readouterr().err

    monkeypatch.setattr("kdcache.client.rest.time.sleep", lambda _s: None)  # no retry backoff
    assert main(["jobs", "--server", f"http://127.0.0.1:{free_port()}"]) == 1  # nobody there
    err = capsys.readouterr().err
    assert err.startswith("error: unreachable: ") and len(err.strip().splitlines()) == 1, err
