"""``kdcache slurm``: the batch script it renders, run by bash, and its bad-input errors.

(The real cluster run is tests/fleet/test_slurm_cluster.py, under ``make test-slurm``.)
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from kdcache.cli.main import main
from kdcache.cli.slurm_script import TEMPLATE, SlurmOptions, placeholders, render

SERVER = "http://10.1.2.3:8080"


def _dry(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(["slurm", "--server", SERVER, "--dry-run", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _sbatch(script: str) -> list[str]:
    return [ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH")]


def test_gpu_array_one_task_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    script = _dry(
        capsys, "--job", "j-42", "--gpus", "8", "--partition", "gpu", "--time", "24:00:00",
        "--account", "proj", "--mem", "64G", "--gpu-type", "a100", "--max-running", "4",
        "--sbatch=--qos=preempt",
    )  # fmt: skip
    opts = _sbatch(script)
    for want in (
        "--array=0-7%4",
        "--gres=gpu:a100:1",
        "--requeue",
        "--signal=B:TERM@120",
        "--partition=gpu",
        "--time=24:00:00",
        "--account=proj",
        "--mem=64G",
        "--qos=preempt",
        "--export=ALL",
        "--cpus-per-task=8",
    ):
        assert want in opts, (want, opts)
    assert script.startswith("#!/bin/bash\n")
    worker = script[script.index("exec ") :]
    assert "--job j-42" in worker and "--device cuda:0" in worker
    assert "--release-on-term" in worker and f"--server {SERVER}" in worker
    # every #SBATCH line comes before the first command, or sbatch ignores it
    first_cmd = min(i for i, ln in enumerate(script.splitlines()) if ln.startswith("set "))
    assert all(
        i < first_cmd for i, ln in enumerate(script.splitlines()) if ln.startswith("#SBATCH")
    )
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_teacher_split_over_the_gpus_of_each_task(capsys: pytest.CaptureFixture[str]) -> None:
    script = _dry(capsys, "--job", "j", "--gpus", "16", "--gpus-per-task", "4")
    opts = _sbatch(script)
    assert "--array=0-3" in opts and "--gres=gpu:4" in opts
    assert "--device cuda:0,cuda:1,cuda:2,cuda:3" in script
    assert main(["slurm", "--server", SERVER, "--job", "j", "--gpus", "6", "--gpus-per-task",
                 "4", "--dry-run"]) == 2  # fmt: skip
    assert "error: --gpus: 6 GPUs do not split into tasks of --gpus-per-task 4" in (
        capsys.readouterr().err
    )


def test_cpu_workers_and_finish_on_term(capsys: pytest.CaptureFixture[str]) -> None:
    script = _dry(capsys, "job.yaml", "--gpus", "2", "--cpu", "--on-term", "finish")
    opts = _sbatch(script)
    assert "--array=0-1" in opts
    assert not [o for o in opts if o.startswith("--gres")]
    assert "--device cpu" in script and "--release-on-term" not in script
    assert "--job '<JOB_ID>'" in script  # a dry run submits nothing, so no id yet


def test_the_token_never_reaches_the_script(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDCACHE_TOKEN", "env-secret-123")
    script = _dry(capsys, "--job", "j", "--gpus", "1", "--token", "flag-secret-456")
    assert "secret" not in script


def test_script_execs_the_worker_with_the_slurm_task_identity(tmp_path: Path) -> None:
    """bash runs the rendered script; the "python" it execs reports its pid and arguments."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "pid=$$"\nfor a in "$@"; do echo "arg=$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    opts = SlurmOptions(server=SERVER, gpus=2, python=str(fake), job_id="j 1", root="/mnt/x y")
    env = {
        **os.environ,
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_ID": "79",
        "CUDA_VISIBLE_DEVICES": "3",
    }
    proc = subprocess.Popen(
        ["bash", "-c", render(opts)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == f"pid={proc.pid}"  # exec: the worker is the batch shell itself
    args = [ln.removeprefix("arg=") for ln in lines[1:]]
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert args == [
        "-m", "kdcache.cli", "worker", "--server", SERVER, "--job", "j 1",
        "--device", "cuda:0", "--max-idle", "60", "--release-on-term", "--root", "/mnt/x y",
        "--worker-id", f"slurm-77_1@{host}",
    ]  # fmt: skip
    assert "array task 1 (Slurm job 79" in err.decode() and "CUDA_VISIBLE_DEVICES=3" in err.decode()


def test_bad_options_are_all_named_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["slurm", "--gpus", "0", "--partition", "a b", "--sbatch=qos", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    for field in ("JOB: ", "--server: ", "--gpus: ", "--partition: ", "--sbatch: "):
        assert f"error: {field}" in err, err
    assert "Traceback" not in err


def test_a_template_file_is_rendered(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    template = tmp_path / "t.sh"
    template.write_text(TEMPLATE.replace("set -euo pipefail", "set -euo pipefail\nmodule load x"))
    script = _dry(capsys, "--job", "j", "--gpus", "3", "--template", str(template))
    assert "module load x" in script and "--array=0-2" in script

    template.write_text("#!/bin/bash\n#SBATCH --array={{ array }}\n{{ nonsense }}\n")
    assert main(["slurm", "--server", SERVER, "--job", "j", "--gpus", "1", "--dry-run",
                 "--template", str(template)]) == 2  # fmt: skip
    assert "error: --template: unknown placeholders nonsense" in capsys.readouterr().err


def test_template_placeholders_are_all_provided() -> None:
    values = SlurmOptions(server=SERVER, gpus=1, python="python").values()
    assert placeholders(TEMPLATE) == set(values)
    script = render(SlurmOptions(server=SERVER, gpus=1, python="p"))
    assert not re.search(r"\{\{ *\w+ *\}\}", script)


def test_without_sbatch_nothing_is_submitted(capsys: pytest.CaptureFixture[str]) -> None:
    # sbatch is checked before the service is asked anything: nobody listens on this port
    code = main(["slurm", "--server", "http://127.0.0.1:9", "--job", "j", "--gpus", "1",
                 "--sbatch-bin", "no-such-sbatch-here"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: no-such-sbatch-here not found"), err
