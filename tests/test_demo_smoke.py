"""Smoke test of ``examples/demo.py`` at tiny size: end to end, quiet, and its table parses."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.client.cache import TeacherCache

ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 384  # demo.TINY.vocab

pytestmark = pytest.mark.slow


def _number(table: str, label: str) -> float:
    """The first number after ``label`` at the start of a table line."""
    m = re.search(rf"^\s*{re.escape(label)}\s+(-?[0-9][0-9,]*\.?[0-9]*)", table, re.MULTILINE)
    assert m is not None, f"no line {label!r} in:\n{table}"
    return float(m.group(1).replace(",", ""))


def test_demo_tiny_runs_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    (out / "stale").mkdir(parents=True)  # a stale file the demo must wipe
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Warning" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]
    assert not (out / "stale").exists()
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {step}" in proc.stdout
    table = proc.stdout[proc.stdout.index("== results") :]

    caches = list((out / "root" / "caches").iterdir())
    assert len(caches) == 1
    cache = TeacherCache(caches[0])
    assert cache.is_complete
    m = cache.manifest
    n_tokens = m.num_rows * m.seq_len
    on_disk = sum(f.stat().st_size for f in caches[0].rglob("*") if f.is_file())

    assert _number(table, "cache size on disk") == pytest.approx(on_disk / 2**20, abs=0.01)
    assert _number(table, "cache bytes/token") == pytest.approx(on_disk / n_tokens, abs=0.1)
    seconds = _number(table, "teacher pass")
    assert 0 < seconds < 300
    uniform = math.log(TINY_VOCAB)
    losses = [_number(table, "teacher")]
    for label in ("hard labels", "hard + top-k KD", "hard + KD + hidden"):
        losses.append(_number(table, f"student {label}"))
    # trained briefly, but every model must beat guessing uniformly over the vocabulary
    assert all(0 < loss < uniform for loss in losses), losses
