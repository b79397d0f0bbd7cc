"""A finished job's rerun and a worker's job start reuse remembered weight hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdcache.cli.main import main
from kdcache.core import fingerprint as fp
from kdcache.core.resolve import load_job, resolve_job
from kdcache.worker import runner


@pytest.fixture
def job(tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path) -> Path:
    spec = {
        "name": "fp-once",
        "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": 4, "temperatures": [1.0]},
        "batch_size": 4,
        "rows_per_shard": 4,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def weight_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Weight files read for hashing (a fresh remembered-hash folder for this test)."""
    monkeypatch.setenv("KDCACHE_FINGERPRINT_CACHE", str(tmp_path / "fpcache"))
    seen: list[Path] = []
    real = fp.sha256_file

    def counting(path: str | Path) -> str:
        if Path(path).suffix in fp.WEIGHT_SUFFIXES:
            seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(fp, "sha256_file", counting)
    return seen


def test_second_run_reads_no_weights_and_loads_no_teacher(
    job: Path,
    tmp_path: Path,
    weight_reads: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "root"
    assert main(["run", str(job), "--root", str(root)]) == 0
    first_url = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(weight_reads) == 1  # model.safetensors, hashed once

    def no_teacher(*_a: object, **_k: object) -> None:
        raise AssertionError("a complete cache must not load its teacher")

    monkeypatch.setattr(runner, "load_teacher", no_teacher)
    assert main(["run", str(job), "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first_url
    assert len(weight_reads) == 1


def test_worker_start_resolves_from_remembered_hashes(job: Path, weight_reads: list[Path]) -> None:
    plan = load_job(job)
    assert len(weight_reads) == 1
    # what a worker does with a lease's spec: resolve it again and load the teacher
    again = runner.prepare_job(plan.spec)
    assert again.manifest.cache_id == plan.cache_id and len(weight_reads) == 1


def test_a_changed_weight_file_changes_the_cache_id(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path, weight_reads: list[Path]
) -> None:
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "teacher": {"hf": str(teacher)},
                "dataset": {"tokens": str(tokens_npy)},
                "outputs": {"topk": 2},
            }
        )
    )
    before = load_job(spec_path)
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    st = weights.stat()
    weights.write_bytes(bytes(data))
    import os

    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    after = resolve_job(before.spec)
    assert after.teacher_fingerprint != before.teacher_fingerprint
    assert after.cache_id != before.cache_id
    assert len(weight_reads) == 2
