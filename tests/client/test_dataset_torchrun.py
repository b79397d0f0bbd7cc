"""examples/train_student.py under ``torchrun --nproc_per_node 2`` (CPU, gloo) learns from the
cache, and its checkpoint resumes in one process with the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_student.py"
STEP = re.compile(r"^step (\d+) loss ([0-9.]+) kd ([0-9.]+) hidden ([0-9.]+)", re.M)


def _run(args: list[str], timeout: float = 150) -> list[tuple[int, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [(int(m[1]), float(m[2])) for m in STEP.finditer(done.stdout)]


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_two_processes_loss_goes_down(cache_dir37: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "student.pt"
    common = ["--cache", cache_dir37, "--temperature", "2.0", "--seed", "0"]
    steps = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLE), *common, "--steps", "30", "--batch-size", "4", "--save", str(ckpt)]
    )  # fmt: skip
    assert [s for s, _ in steps] == list(range(1, 31))
    losses = [loss for _, loss in steps]
    assert losses[-1] < losses[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    resumed = _run(
        [sys.executable, str(EXAMPLE), *common, "--steps", "33", "--batch-size", "8",
         "--resume", str(ckpt)]
    )  # fmt: skip
    assert [s for s, _ in resumed] == [31, 32, 33]
