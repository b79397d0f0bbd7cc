"""Sequence-level KD jobs: the teacher's continuations become the cache's rows.

Greedy rows equal Hugging Face ``generate`` run on each prompt alone; the cached top-k and
log-normalisers over them equal a dense float64 teacher forward; sampling is seeded per dataset
row (the same tokens whatever the batch), follows the teacher's tempered, nucleus-cut
distribution, and a job killed mid-way resumes to the same bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr

from kdcache.core.errors import SpecError
from kdcache.core.reader import CacheReader
from kdcache.core.resolve import resolve_job
from kdcache.core.spec import GenerateSpec, parse_spec
from kdcache.worker.datasets import open_source
from kdcache.worker.generate import RowSampler, generate_rows, prompt_lengths, step_uniforms
from kdcache.worker.runner import run_job
from kdcache.worker.teachers import load_teacher

PROMPTS = [
    "The teacher runs once;",
    "Knowledge distillation matches",
    "Hello",
    "A shard is a contiguous range of rows written by one worker.",
    "the quick brown",
    "Top-k",
    "KD",
]
SEQ_LEN, NEW = 12, 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a loaded 2-core machine: a second thread only adds contention (a forward
    of the test teacher takes ~20x longer with two busy threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kdcache(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def prompts_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROMPTS))
    return path


def _spec(teacher: Path, prompts: Path, **generate: Any) -> dict[str, Any]:
    return {
        "name": "seqkd",
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"jsonl": str(prompts), "seq_len": SEQ_LEN, "pack": False},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 3,
        "rows_per_shard": 4,
        "generate": {"max_new_tokens": NEW, **generate},
    }


@pytest.fixture(scope="module")
def model(tiny_teacher_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_teacher_dir: Path, prompts_jsonl: Path) -> tuple[np.ndarray, np.ndarray]:
    """The prompt rows (n, SEQ_LEN) and their real lengths, as the dataset makes them."""
    ds = parse_spec(_spec(tiny_teacher_dir, prompts_jsonl)).dataset
    src = open_source(ds, str(tiny_teacher_dir))
    lengths = prompt_lengths(src.loss_mask(0, src.num_rows))
    np.testing.assert_array_equal(lengths, src.lengths)  # type: ignore[attr-defined]
    return src.rows(0, src.num_rows), lengths


@pytest.fixture(scope="module")
def greedy_cache(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, prompts_jsonl: Path
) -> str:
    spec = parse_spec(_spec(tiny_teacher_dir, prompts_jsonl))
    return run_job(spec, tmp_path_factory.mktemp("root"))


def _hf_greedy(model: Any, prompt: np.ndarray, new: int) -> np.ndarray:
    """HF generate on one unpadded prompt, cut after the first EOS (id 0)."""
    with torch.inference_mode():
        out = model.generate(
            torch.from_numpy(prompt)[None],
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=0,
            pad_token_id=1,
        )[0, len(prompt) :].numpy()
    hits = np.flatnonzero(out == 0)
    return out[: hits[0] + 1] if hits.size else out


def test_greedy_rows_equal_hf_generate_on_each_prompt(
    greedy_cache: str, model: Any, prompts: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, lengths = prompts
    g = zarr.open_group(greedy_cache, mode="r")
    ids, mask = g["input_ids"][:], g["loss_mask"][:]
    assert ids.shape == mask.shape == (len(PROMPTS), SEQ_LEN + NEW)
    assert len(set(lengths.tolist())) > 3  # prompts of several lengths share batches
    for r, length in enumerate(lengths):
        cont = _hf_greedy(model, rows[r, :length], NEW)
        end = length + len(cont)
        np.testing.assert_array_equal(ids[r, :length], rows[r, :length], err_msg=f"row {r}")
        np.testing.assert_array_equal(ids[r, length:end], cont, err_msg=f"row {r}")
        assert (ids[r, end:] == 1).all()  # the teacher's pad id after the continuation
        want = np.zeros(SEQ_LEN + NEW, dtype=bool)
        want[length - 1 : end - 1] = True
        np.testing.assert_array_equal(mask[r], want, err_msg=f"row {r}")


def test_cached_arrays_are_the_teachers_over_its_generations(greedy_cache: str, model: Any) -> None:
    g = zarr.open_group(greedy_cache, mode="r")
    ids, mask = g["input_ids"][:], g["loss_mask"][:]
    with torch.inference_mode():
        logits = model.double()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    model.float()
    lse = np.logaddexp.reduce(logits, axis=-1)
    lse2 = np.logaddexp.reduce(logits / 2.0, axis=-1)
    np.testing.assert_allclose(g["topk/logsumexp"][:][..., 0], lse, atol=2e-4)
    np.testing.assert_allclose(g["topk/logsumexp"][:][..., 1], lse2, atol=2e-4)
    # greedy: on every generated position the teacher's top-1 is the token that follows
    top1 = g["topk/indices"][:][..., 0]
    np.testing.assert_array_equal(top1[:, :-1][mask[:, :-1]], ids[:, 1:][mask[:, :-1]])
    man = CacheReader(greedy_cache).manifest
    assert man.seq_len == SEQ_LEN + NEW
    assert man.dataset["generate"] == {"max_new_tokens": NEW, "do_sample": False,
                                       "stop_at_eos": True}  # fmt: skip


def test_eos_ends_a_continuation(tiny_teacher_dir: Path, prompts: tuple[np.ndarray, ...]) -> None:
    rows, lengths = prompts
    teacher = load_teacher(parse_spec(_spec(tiny_teacher_dir, Path("x"))).teacher)
    free = GenerateSpec(max_new_tokens=NEW, stop_at_eos=False)
    ids, mask = generate_rows(teacher, rows, lengths, free, batch_size=4)
    assert mask.sum(axis=1).tolist() == [NEW] * len(rows)  # never stopped
    # make row 0's third generated token the EOS: it must end there, the rest stay as they were
    stop = int(ids[0, lengths[0] + 2])
    model = teacher.model  # type: ignore[attr-defined]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        cut, cut_mask = generate_rows(
            teacher, rows, lengths, GenerateSpec(max_new_tokens=NEW), batch_size=4
        )
    finally:
        model.generation_config.eos_token_id = old
    first = lengths[0] + int(np.flatnonzero(ids[0, lengths[0] :] == stop)[0])
    np.testing.assert_array_equal(cut[0, : first + 1], ids[0, : first + 1])
    assert (cut[0, first + 1 :] == 1).all()
    assert cut_mask[0].sum() == first + 1 - lengths[0]


def test_sampled_rows_do_not_depend_on_the_batch(
    tiny_teacher_dir: Path, prompts: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, lengths = prompts
    teacher = load_teacher(parse_spec(_spec(tiny_teacher_dir, Path("x"))).teacher)
    gen = GenerateSpec(max_new_tokens=NEW, do_sample=True, temperature=1.5, seed=7)
    a, ma = generate_rows(teacher, rows, lengths, gen, batch_size=2)
    b, mb = generate_rows(teacher, rows[3:], lengths[3:], gen, batch_size=5, row_offset=3)
    np.testing.assert_array_equal(a[3:], b)
    np.testing.assert_array_equal(ma[3:], mb)
    other = gen.model_copy(update={"seed": 8})
    c, _ = generate_rows(teacher, rows, lengths, other, batch_size=2)
    assert (c != a).any()
    plain = GenerateSpec(max_new_tokens=NEW)
    greedy, _ = generate_rows(teacher, rows, lengths, plain, batch_size=3)
    assert (a != greedy).any()
    # a nucleus of (almost) no mass keeps only the most likely token: greedy again
    tiny = gen.model_copy(update={"top_p": 1e-9})
    d, _ = generate_rows(teacher, rows, lengths, tiny, batch_size=3)
    np.testing.assert_array_equal(d, greedy)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (2.0, 0.8)])
def test_row_sampler_draws_the_tempered_nucleus(temperature: float, top_p: float) -> None:
    n = 40_000
    logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, -3.0], dtype=torch.float32)
    p = torch.softmax(logits.double() / temperature, -1)
    before = p.cumsum(-1) - p  # p is already sorted descending
    p = torch.where(before < top_p, p, 0.0)
    p = (p / p.sum()).numpy()
    u = step_uniforms(3, range(n), 2)
    sampler = RowSampler(u, prompt_width=4, temperature=temperature, top_p=top_p)
    scores = sampler(torch.zeros((n, 5), dtype=torch.long), logits.expand(n, -1).clone())
    assert torch.isinf(scores).sum(-1).eq(5).all() and scores.max(-1).values.eq(0).all()
    freq = np.bincount(scores.argmax(-1).numpy(), minlength=6) / n
    se = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) <= 5 * se + 1e-12).all(), (freq, p)
    assert (freq[p == 0] == 0).all()


def test_spec_errors_name_the_generate_fields(
    tiny_teacher_dir: Path, prompts_jsonl: Path, chat_jsonl: Path, chat_tokenizer_dir: Path
) -> None:
    for gen, field in [
        ({"temperature": 0.5}, "generate"),
        ({"max_new_tokens": 0}, "generate.max_new_tokens"),
        ({"do_sample": True, "top_p": 1.5}, "generate.top_p"),
        ({"beams": 4}, "generate.beams"),
    ]:
        with pytest.raises(SpecError) as err:
            parse_spec(_spec(tiny_teacher_dir, prompts_jsonl, **gen))
        assert [p.field for p in err.value.problems] == [field], err.value.problems
    typo = _spec(tiny_teacher_dir, prompts_jsonl, do_sample=True, temprature=0.5)
    assert "did you mean 'temperature'?" in str(pytest.raises(SpecError, parse_spec, typo).value)
    assert "only apply with do_sample: true" in str(
        pytest.raises(SpecError, parse_spec, _spec(tiny_teacher_dir, prompts_jsonl, seed=2)).value
    )
    long = parse_spec(_spec(tiny_teacher_dir, prompts_jsonl, max_new_tokens=200))
    with pytest.raises(SpecError) as err:
        resolve_job(long)
    assert [p.field for p in err.value.problems] == ["generate.max_new_tokens"]
    assert "12 tokens + 200 new tokens exceed the teacher's window of 128" in str(err.value)
    chat = _spec(tiny_teacher_dir, chat_jsonl)
    chat["dataset"].update(messages_field="messages", tokenizer=str(chat_tokenizer_dir))
    with pytest.raises(SpecError) as err:
        resolve_job(parse_spec(chat))
    assert [p.field for p in err.value.problems] == ["generate"]


def test_the_cache_id_covers_what_shapes_the_tokens(
    tiny_teacher_dir: Path, prompts_jsonl: Path
) -> None:
    def cid(plain: bool = False, **gen: Any) -> str:
        spec = _spec(tiny_teacher_dir, prompts_jsonl, **gen)
        if plain:
            spec.pop("generate")
        return resolve_job(parse_spec(spec)).cache_id

    ids = [
        cid(plain=True),
        cid(),
        cid(max_new_tokens=NEW + 1),
        cid(stop_at_eos=False),
        cid(do_sample=True),
        cid(do_sample=True, seed=1),
        cid(do_sample=True, temperature=0.5),
        cid(do_sample=True, top_p=0.9),
    ]
    assert len(set(ids)) == len(ids)
    assert cid(do_sample=True) == cid(do_sample=True, seed=0, temperature=1.0, top_p=1.0)
    assert cid() == cid(seed=0, temperature=1.0, top_p=1.0)  # a dumped greedy spec parses


GEN_TEACHER = """
import time, torch
from transformers import LlamaConfig, LlamaForCausalLM

def make():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.3, eos_token_id=0, pad_token_id=1))
    model.model.layers[0].register_forward_pre_hook(lambda *a: time.sleep(0.01))
    return model
"""


def _gen_job(tmp_path: Path) -> Path:
    (tmp_path / "gen_teacher_mod.py").write_text(GEN_TEACHER)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "prompts.npy", rng.integers(2, 64, (40, 6)).astype(np.int32))
    spec = {
        "teacher": {"module": "gen_teacher_mod:make", "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": "prompts.npy"},
        "outputs": {"topk": 5, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 2,
        "rows_per_shard": 4,
        "generate": {"max_new_tokens": 10, "do_sample": True, "temperature": 1.2, "seed": 3},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    return job


@pytest.mark.slow
def test_a_killed_generation_job_resumes_to_the_same_cache(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    job_a, job_b = _gen_job(a), _gen_job(b)
    whole = _kdcache(["run", str(job_a), "--root", "root"], a)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    cache_a = Path(out.strip().splitlines()[-1])

    killed = _kdcache(["run", str(job_b), "--root", "root"], b)
    records = b / "root" / "caches"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and killed.poll() is None:
        if len(list(records.glob("*/_kdcache/shards/*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    cache_b = next(records.iterdir())
    partial = len(list((cache_b / "_kdcache" / "shards").glob("*.json")))
    assert 3 <= partial < 10

    rerun = _kdcache(["run", str(job_b), "--root", "root"], b)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert Path(out.strip().splitlines()[-1]) == cache_b and cache_a.name == cache_b.name
    ga, gb = zarr.open_group(str(cache_a), mode="r"), zarr.open_group(str(cache_b), mode="r")
    names = ["input_ids", "loss_mask", "topk/logprobs", "topk/indices", "topk/logsumexp",
             "hidden/1"]  # fmt: skip
    for name in names:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    mask = ga["loss_mask"][:]
    assert mask.shape == (40, 16) and not mask[:, :5].any() and mask[:, 5].all()
    files = [
        {p.relative_to(c): p.read_bytes() for p in c.rglob("*/c/*/*") if p.is_file()}
        for c in (cache_a, cache_b)
    ]
    assert files[0] and files[0] == files[1]
