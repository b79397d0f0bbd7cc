"""extract: every cached number against a dense float64 reference from the same teacher."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kdcache.core.errors import DatasetError, TeacherError
from kdcache.core.format import index_dtype
from kdcache.worker.extract import default_t_chunk, extract, extract_batches, hidden_to_numpy
from kdcache.worker.teachers import HFTeacher, Teacher, TeacherOutput, load_teacher

TEMPS = (1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path) -> HFTeacher:
    t = load_teacher(
        SimpleNamespace(hf=str(tiny_teacher_dir), module=None, dtype="float32", device="cpu")
    )
    assert isinstance(t, HFTeacher)
    return t


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 320, size=(3, 16)).astype(np.int32)


def run(teacher: Teacher, ids: np.ndarray, **kw: Any) -> dict[str, np.ndarray]:
    args: dict[str, Any] = {
        "topk": 8,
        "temperatures": TEMPS,
        "layers": [0, 1, 2],
        "hidden_dtype": "float16",
        "index_dtype": np.uint16,
    }
    args.update(kw)
    return extract(teacher, ids, **args)


def reference(teacher: HFTeacher, ids: np.ndarray) -> SimpleNamespace:
    with torch.inference_mode():
        out = teacher.model(
            torch.from_numpy(ids).long(), output_hidden_states=True, use_cache=False
        )
    return SimpleNamespace(z=out.logits.double(), hidden=out.hidden_states)


def test_topk_and_logsumexp_match_float64_reference(teacher: HFTeacher, ids: np.ndarray) -> None:
    got = run(teacher, ids)
    ref = reference(teacher, ids)
    logp = torch.log_softmax(ref.z, dim=-1)
    vals, idx = torch.topk(logp, 8, dim=-1)
    assert got["topk/logprobs"].dtype == np.float16 and got["topk/logprobs"].shape == (3, 16, 8)
    assert got["topk/indices"].dtype == np.uint16
    np.testing.assert_array_equal(got["topk/indices"].astype(np.int64), idx.numpy())
    np.testing.assert_allclose(got["topk/logprobs"], vals.numpy(), rtol=1e-3, atol=1e-3)
    assert np.all(np.diff(got["topk/logprobs"].astype(np.float32), axis=-1) <= 0)
    lse = np.stack([torch.logsumexp(ref.z / t, dim=-1).numpy() for t in TEMPS], axis=-1)
    assert got["topk/logsumexp"].dtype == np.float32 and got["topk/logsumexp"].shape == (3, 16, 3)
    np.testing.assert_allclose(got["topk/logsumexp"], lse, rtol=1e-6, atol=1e-5)


def test_full_topk_reconstructs_every_temperature(teacher: HFTeacher, ids: np.ndarray) -> None:
    """With k = V the cache is the whole distribution: p_t(v) = exp(z_v / t - lse_t) sums to 1."""
    got = run(teacher, ids, topk=teacher.vocab_size, layers=[])
    lp = got["topk/logprobs"].astype(np.float64)
    lse = got["topk/logsumexp"].astype(np.float64)
    z = lp + lse[..., :1]
    for j, t in enumerate(TEMPS):
        total = np.exp(z / t - lse[..., j : j + 1]).sum(-1)
        np.testing.assert_allclose(total, 1.0, rtol=0, atol=5e-3)


def test_hidden_states_in_each_dtype(teacher: HFTeacher, ids: np.ndarray) -> None:
    ref = reference(teacher, ids).hidden
    f16 = run(teacher, ids, topk=0, hidden_dtype="float16")
    f32 = run(teacher, ids, topk=0, hidden_dtype="float32")
    bf16 = run(teacher, ids, topk=0, hidden_dtype="bfloat16")
    for layer in (0, 1, 2):
        key = f"hidden/{layer}"
        assert f16[key].dtype == np.float16 and f16[key].shape == (3, 16, 32)
        np.testing.assert_allclose(f16[key], ref[layer].numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(f32[key], ref[layer].numpy())
        assert bf16[key].dtype == np.uint16
        want = ref[layer].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(bf16[key], want)
        back = torch.from_numpy(bf16[key].view(np.int16)).view(torch.bfloat16)
        assert torch.equal(back, ref[layer].to(torch.bfloat16))


def test_topk_zero_keeps_only_hidden(teacher: HFTeacher, ids: np.ndarray) -> None:
    assert sorted(run(teacher, ids, topk=0, layers=[2])) == ["hidden/2"]
    assert sorted(run(teacher, ids, layers=[])) == [
        "topk/indices",
        "topk/logprobs",
        "topk/logsumexp",
    ]


@pytest.mark.parametrize("t_chunk", [1, 3, 5, 16, 100])
def test_chunking_along_t_is_exact(teacher: HFTeacher, ids: np.ndarray, t_chunk: int) -> None:
    # unfused: the chunks slice one logits tensor, so every number is bit-equal; the fused head
    # runs one product per chunk, whose rounding may depend on the chunk's shape
    whole = run(teacher, ids, fused=False)
    chunked = run(teacher, ids, t_chunk=t_chunk, fused=False)
    fused = run(teacher, ids, t_chunk=t_chunk)
    assert sorted(whole) == sorted(chunked) == sorted(fused)
    for key, a in whole.items():
        np.testing.assert_array_equal(chunked[key], a, err_msg=key)
        np.testing.assert_allclose(fused[key], a, rtol=1e-5, atol=1e-3, err_msg=key)


def test_default_t_chunk_bounds_float32_logits() -> None:
    t = default_t_chunk(8, 128_000)
    assert 8 * t * 128_000 * 4 <= 256 << 20 < 8 * (t + 1) * 128_000 * 4
    assert default_t_chunk(1024, 1 << 20) == 1
    # a row minimum lifts chunks that the byte budget alone makes too short for the head
    assert default_t_chunk(8, 131_072, 16 << 20) == 4
    assert default_t_chunk(8, 131_072, 16 << 20, min_rows=128) == 16
    assert default_t_chunk(8, 8192, 16 << 20, min_rows=128) == 64  # the budget already gives more
    assert default_t_chunk(3, 131_072, 16 << 20, min_rows=128) == 43


def test_index_dtype_choice() -> None:
    assert index_dtype(320) == "uint16"
    assert index_dtype(65536) == "uint16"
    assert index_dtype(65537) == "int32"


class StubTeacher:
    """A teacher with fixed logits (1, T, V); counts forwards."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.vocab_size: int = logits.shape[-1]
        self.num_layers: int | None = None
        self.hidden_size: int | None = None
        self.max_positions: int | None = None
        self.dtype = logits.dtype
        self.device = torch.device("cpu")
        self.description = "stub"
        self.calls = 0

    def forward(self, ids: torch.Tensor, layers: Sequence[int]) -> TeacherOutput:
        self.calls += 1
        return TeacherOutput(logits=self.logits.expand(ids.shape[0], -1, -1))


def test_large_vocab_uses_int32_indices() -> None:
    v = 70_000
    logits = torch.zeros((1, 4, v))
    logits[0, :, 69_999] = 10.0
    logits[0, :, 65_537] = 9.0
    teacher = StubTeacher(logits)
    ids = np.zeros((2, 4), dtype=np.int64)
    got = run(teacher, ids, topk=2, layers=[], index_dtype=np.dtype(index_dtype(v)))
    assert got["topk/indices"].dtype == np.int32
    assert (got["topk/indices"][..., 0] == 69_999).all()
    assert (got["topk/indices"][..., 1] == 65_537).all()
    with pytest.raises(ValueError, match="cannot hold"):
        run(teacher, ids, topk=2, layers=[], index_dtype=np.uint16)


@pytest.mark.parametrize(
    ("bad", "match"),
    [(400, "row 1235: token id 400 >= vocab size 320"), (-1, "row 1235: token id -1 < 0")],
)
def test_bad_token_id_names_the_dataset_row(bad: int, match: str) -> None:
    teacher = StubTeacher(torch.zeros((1, 4, 320)))
    ids = np.zeros((3, 4), dtype=np.int64)
    ids[1, 2] = bad
    with pytest.raises(DatasetError, match=match) as err:
        run(teacher, ids, layers=[], row_offset=1234)
    assert err.value.row == 1235
    assert teacher.calls == 0, "ids are checked before the forward"


def test_non_integer_ids_rejected() -> None:
    with pytest.raises(DatasetError, match="integers"):
        run(StubTeacher(torch.zeros((1, 4, 320))), np.zeros((2, 4)), layers=[])


def test_non_finite_logits_are_a_teacher_error() -> None:
    logits = torch.zeros((1, 4, 320))
    logits[0, 2, 7] = float("nan")
    with pytest.raises(TeacherError, match="non-finite logits at row 10"):
        run(StubTeacher(logits), np.zeros((1, 4), dtype=np.int64), layers=[], row_offset=10)


def test_topk_larger_than_vocab_rejected() -> None:
    with pytest.raises(ValueError, match="topk"):
        run(
            StubTeacher(torch.zeros((1, 4, 16))),
            np.zeros((1, 4), dtype=np.int64),
            topk=17,
            layers=[],
        )


def test_extract_batches_matches_one_batch(teacher: HFTeacher, ids: np.ndarray) -> None:
    kw: dict[str, Any] = {
        "topk": 8,
        "temperatures": TEMPS,
        "layers": [1],
        "hidden_dtype": "float32",
        "index_dtype": np.uint16,
    }
    whole = extract(teacher, ids, **kw)
    batched = extract_batches(teacher, ids, batch_size=2, **kw)
    assert sorted(batched) == sorted(whole)
    for key, a in whole.items():
        assert batched[key].shape == a.shape and batched[key].dtype == a.dtype
        np.testing.assert_allclose(
            batched[key].astype(np.float64), a.astype(np.float64), rtol=1e-3, atol=1e-3, err_msg=key
        )


def test_extract_batches_checks_all_rows_first() -> None:
    teacher = StubTeacher(torch.zeros((1, 4, 320)))
    ids = np.zeros((5, 4), dtype=np.int64)
    ids[4, 0] = 320
    with pytest.raises(DatasetError, match="row 104: ") as err:
        extract_batches(
            teacher,
            ids,
            batch_size=2,
            row_offset=100,
            topk=4,
            temperatures=[1.0],
            layers=[],
            hidden_dtype="float16",
            index_dtype=np.uint16,
        )
    assert err.value.row == 104 and teacher.calls == 0


def test_hidden_to_numpy_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="hidden_dtype"):
        hidden_to_numpy(torch.zeros(1, 1, 1), "int8")
