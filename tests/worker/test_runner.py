"""The embedded job: cached numbers equal a direct teacher forward; resume; bad data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from kdcache.core.errors import DatasetError
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.worker.runner import run_job

TEMPS = [1.0, 2.0, 4.0]


def _spec(teacher: Path, tokens: Path, **kw: object) -> dict:
    spec = {
        "name": "runner-test",
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 8, "temperatures": TEMPS, "hidden_layers": [0, 1, 2]},
        "batch_size": 3,
        "rows_per_shard": 4,
    }
    spec.update(kw)
    return spec


@pytest.fixture(scope="module")
def cached(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> str:
    root = tmp_path_factory.mktemp("root")
    return run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy)), root)


def test_cache_equals_direct_fp32_forward(
    cached: str, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    ids = np.load(tokens_npy).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    z = out.logits.double()
    r = CacheReader(cached)
    assert r.is_complete and r.manifest.num_rows == ids.shape[0]
    np.testing.assert_array_equal(r.read("input_ids", slice(None)), ids)
    logprobs = torch.from_numpy(r.read("topk/logprobs", slice(None)).astype(np.float64))
    indices = torch.from_numpy(r.read("topk/indices", slice(None)).astype(np.int64))
    lse = torch.from_numpy(r.read("topk/logsumexp", slice(None)).astype(np.float64))
    ref_lp = torch.log_softmax(z, -1)
    ref_vals, _ = ref_lp.topk(8, -1)
    # values: fp16 storage, relative precision 2^-11
    torch.testing.assert_close(logprobs, ref_vals, rtol=2e-3, atol=2e-3)
    # indices: the cached ids carry the cached values (ties may reorder)
    torch.testing.assert_close(ref_lp.gather(-1, indices), ref_vals, rtol=2e-3, atol=2e-3)
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()
    for i, t in enumerate(TEMPS):
        torch.testing.assert_close(lse[..., i], torch.logsumexp(z / t, -1), rtol=1e-5, atol=1e-5)
    for layer in (0, 1, 2):
        stored = torch.from_numpy(r.read(f"hidden/{layer}", slice(None)).view(np.int16))
        ref = out.hidden_states[layer].to(torch.bfloat16).view(torch.int16)
        assert torch.equal(stored, ref), f"hidden/{layer} not bit-exact bf16"


def test_cache_holds_the_loss_mask(cached: str, tokens_npy: Path) -> None:
    r = CacheReader(cached)
    assert r.manifest.loss_mask
    mask = r.read("loss_mask", slice(None))
    assert mask.dtype == np.bool_ and mask.shape == np.load(tokens_npy).shape
    assert mask[:, :-1].all() and not mask[:, -1].any()
    assert all(c.ok for c in r.verify())


def test_store_opens_with_plain_zarr(cached: str) -> None:
    g = zarr.open_group(cached, mode="r")
    assert set(g.array_keys()) == {"input_ids", "loss_mask"}
    assert set(g["topk"].array_keys()) == {"logprobs", "indices", "logsumexp"}
    assert g["hidden/2"].attrs["dtype"] == "bfloat16"
    assert g.attrs["kdcache"]["temperatures"] == TEMPS


def test_rerun_is_a_no_op(cached: str, tiny_teacher_dir: Path, tokens_npy: Path) -> None:
    root = Path(cached).parent.parent
    before = {p: p.stat().st_mtime_ns for p in Path(cached).rglob("*") if p.is_file()}
    assert run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy)), root) == cached
    after = {p: p.stat().st_mtime_ns for p in Path(cached).rglob("*") if p.is_file()}
    assert before == after


def test_bad_token_fails_naming_row_and_keeps_shards(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    ids = np.load(tokens_npy)
    ids[6, 3] = 320  # == vocab size: one past the last id
    np.save(tmp_path / "bad.npy", ids)
    with pytest.raises(DatasetError, match="row 6") as info:
        run_job(parse_spec(_spec(tiny_teacher_dir, tmp_path / "bad.npy")), tmp_path / "root")
    assert info.value.row == 6
    cache = next((tmp_path / "root" / "caches").iterdir())
    r = CacheReader(str(cache))
    assert sorted(r.completed()) == [0]  # rows 0-3 done; shard 1 (rows 4-7) failed
    np.testing.assert_array_equal(r.read("input_ids", slice(0, 4)), ids[:4])


SLOW_TEACHER = textwrap.dedent(
    """
    import time, torch
    from torch import nn

    class Slow(nn.Module):
        vocab_size = 50

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 50)

        def forward(self, ids):
            time.sleep(0.15)
            h = torch.tanh(self.emb(ids))
            return self.out(h), (self.emb(ids), h)

    def make():
        return Slow()
    """
)


def _slow_job(tmp_path: Path) -> Path:
    (tmp_path / "slow_teacher_mod.py").write_text(SLOW_TEACHER)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "tokens.npy", rng.integers(0, 50, (40, 12)).astype(np.int32))
    spec = {
        "teacher": {"module": "slow_teacher_mod:make", "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": "tokens.npy"},
        "outputs": {"topk": 5, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 2,
        "rows_per_shard": 4,
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    return job


def _kdcache(args: list[str], cwd: Path, **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(cache), mode="r")
    names = ["input_ids", "topk/logprobs", "topk/indices", "topk/logsumexp", "hidden/1"]
    return {n: g[n][:] for n in names}


def _chunk_files(cache: Path) -> dict[Path, bytes]:
    return {
        p.relative_to(cache): p.read_bytes()
        for p in cache.rglob("*")
        if p.is_file() and "/c/" in p.as_posix()
    }


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_cache(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    job_a, job_b = _slow_job(a), _slow_job(b)
    whole = _kdcache(["run", str(job_a), "--root", "root"], a)
    out, err = whole.communicate(timeout=120)
    assert whole.returncode == 0, err
    cache_a = Path(out.strip().splitlines()[-1])

    killed = _kdcache(["run", str(job_b), "--root", "root"], b)
    records = b / "root" / "caches"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = list(records.glob("*/_kdcache/shards/*.json"))
        if len(done) >= 3:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    cache_b = next(records.iterdir())
    partial = len(list((cache_b / "_kdcache" / "shards").glob("*.json")))
    assert 3 <= partial < 10

    rerun = _kdcache(["run", str(job_b), "--root", "root"], b)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert Path(out.strip().splitlines()[-1]) == cache_b
    assert cache_a.name == cache_b.name  # same content -> same cache id
    arr_a, arr_b = _arrays(cache_a), _arrays(cache_b)
    for name in arr_a:
        np.testing.assert_array_equal(arr_a[name], arr_b[name], err_msg=name)
    files_a = {
        p.relative_to(cache_a): p.read_bytes() for p in cache_a.rglob("*/c/*/*") if p.is_file()
    }
    files_b = {
        p.relative_to(cache_b): p.read_bytes() for p in cache_b.rglob("*/c/*/*") if p.is_file()
    }
    assert files_a.keys() == files_b.keys() and files_a == files_b
    assert not list(cache_b.rglob("*.partial"))


def test_a_writer_resolving_another_dtype_cannot_join(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdcache.core.errors import ManifestMismatchError
    from kdcache.worker import teachers

    spec = _spec(tiny_teacher_dir, tokens_npy)
    spec["teacher"]["dtype"] = "auto"  # float32 on this CPU ...
    url = run_job(parse_spec(spec), tmp_path)
    assert CacheReader(url).manifest.teacher["resolved_dtype"] == "float32"
    # ... bfloat16 on a GPU worker: same cache id, different numbers; it must not write there
    monkeypatch.setattr(teachers, "resolve_dtype", lambda dtype, device: torch.bfloat16)
    with pytest.raises(ManifestMismatchError, match="bfloat16"):
        run_job(parse_spec(spec), tmp_path)
