"""``kdcache plan``: the prediction from a few rows is within 15% of what the run writes, per array
and in total; nothing is written; bad jobs exit 2 naming the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kdcache.cli.main import main
from kdcache.core.inspect import inspect_cache
from kdcache.core.spec import parse_spec
from kdcache.worker import toy
from kdcache.worker.plan import plan_job, sample_blocks
from kdcache.worker.runner import run_job

ROWS, SEQ = 64, 32


def _spec(teacher: Path, tokens: Path, **outputs: object) -> dict:
    return {
        "name": "plan",
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1], **outputs},
        "batch_size": 4,
        "rows_per_shard": 16,
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Path:
    vocab = int(json.loads((tiny_teacher_dir / "config.json").read_text())["vocab_size"])
    return toy.make_tokens(tmp_path_factory.mktemp("plan") / "t.npy", ROWS, SEQ, vocab, seed=3)


def test_sample_blocks_spread_without_overlap() -> None:
    assert sample_blocks(100, 8) == [(0, 2), (25, 27), (50, 52), (75, 77)]
    assert sample_blocks(10, 10) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert sample_blocks(5, 50) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert sample_blocks(1, 3) == [(0, 1)]


@pytest.mark.parametrize(
    "outputs",
    [{}, {"topk_codec": "lossless", "sample_draws": 8}],
    ids=["v1", "lossless+sample"],
)
def test_plan_within_15_percent_of_the_run(
    tiny_teacher_dir: Path, tokens: Path, tmp_path: Path, outputs: dict
) -> None:
    spec = parse_spec(_spec(tiny_teacher_dir, tokens, **outputs))
    plan = plan_job(spec, rows=8)
    assert plan.sample_rows == 8 and plan.tokens == ROWS * SEQ and plan.teacher_seconds > 0
    url = run_job(spec, tmp_path / "root")
    info = inspect_cache(url)
    real = {a["name"]: a["bytes"] for a in info["arrays"]}
    assert set(plan.arrays) == set(real)
    for name, size in real.items():
        if size > 0.05 * info["bytes"]:  # the arrays that matter: each within 15%
            assert abs(plan.arrays[name] - size) <= 0.15 * size, (name, plan.arrays[name], size)
    assert abs(plan.total_bytes - info["bytes"]) <= 0.15 * info["bytes"]
    assert abs(plan.bytes_per_token - info["bytes_per_token"]) <= 0.15 * info["bytes_per_token"]


def test_cli_plan_prints_the_prediction_and_writes_nothing(
    tiny_teacher_dir: Path, tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_spec(tiny_teacher_dir, tokens)))
    before = sorted(p.name for p in tmp_path.iterdir())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["plan", str(job), "--rows", "4", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert main(["plan", str(job), "--rows", "4"]) == 0
        text = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert out["tokens"] == ROWS * SEQ and out["sample_rows"] == 4
    assert set(out["arrays"]) >= {"input_ids", "topk/logprobs", "topk/indices", "hidden/1"}
    assert out["bytes"] == sum(out["arrays"].values())
    for word in ("topk/logprobs", "bytes/token", "teacher", f"{ROWS * SEQ:,} tokens"):
        assert word in text


def test_cli_plan_bad_jobs_exit_2(
    tiny_teacher_dir: Path, tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    bad = _spec(tiny_teacher_dir, tokens, topk=100_000)
    bad["teacher"]["hf"] = str(tmp_path / "no-such-teacher")
    job.write_text(yaml.safe_dump(bad))
    assert main(["plan", str(job)]) == 2
    err = capsys.readouterr().err
    assert "teacher" in err and "no-such-teacher" in err
    job.write_text(yaml.safe_dump(_spec(tiny_teacher_dir, tokens, topk=100_000)))
    assert main(["plan", str(job)]) == 2
    assert "topk" in capsys.readouterr().err
    job.write_text(yaml.safe_dump(_spec(tiny_teacher_dir, tokens)))
    assert main(["plan", str(job), "--rows", "0"]) == 2
    assert "--rows" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
