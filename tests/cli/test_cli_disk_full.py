"""A full disk under ``kdcache run``: one ``error:`` line and exit 1, no traceback; the run
resumes where it stopped once there is room.

The disk is a real, small tmpfs (needs root to mount; skipped otherwise). The service side of a
full disk is in tests/service/test_service_hardening.py (fault injection: OSError(ENOSPC))."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kdcache.worker import toy


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)])
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.integration
def test_run_on_a_full_disk_says_so_in_one_line(
    small_disk: Path, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    tokens = toy.make_tokens(tmp_path / "t.npy", 64, 32, 128, seed=3)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
                "dataset": {"tokens": str(tokens)},
                "outputs": {"topk": 16, "hidden_layers": [1, 2], "hidden_dtype": "float32"},
                "rows_per_shard": 8,
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "run", str(job), "--root", str(small_disk)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("20")]  # no log lines
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device"), out.stderr
