"""Several caches over the same rows read as one ensemble: CacheDataset([...]) and MultiCache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_dataset_support import copy_with_loss_mask

from kdcache.client import CacheDataset, TeacherCache, losses
from kdcache.client.ensemble import MultiCache, check_weights, teacher_view
from kdcache.core.errors import ManifestMismatchError
from kdcache.core.spec import parse_spec
from kdcache.worker import toy
from kdcache.worker.runner import run_job

ROWS, SEQ = 20, 16


def _cache(
    root: Path, teacher: Path, tokens: Path, topk: int, layers: list[int], per_shard: int
) -> str:
    spec = {
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": topk, "temperatures": [1.0, 2.0], "hidden_layers": layers},
        "rows_per_shard": per_shard,
        "batch_size": 8,
    }
    return run_job(parse_spec(spec), root)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ensemble")
    tokens = toy.make_tokens(base / "tokens.npy", ROWS, SEQ, 320, seed=3)
    other = np.load(tokens)
    other[13, 4] = (other[13, 4] + 1) % 320
    np.save(base / "other.npy", other)
    teacher_b = toy.make_tokenizer(toy.make_tiny_teacher(base / "tb", seed=1), vocab_size=320)
    teacher_c = toy.make_tiny_teacher(base / "tc", seed=2, vocab_size=330)
    a = _cache(base / "ra", tiny_teacher_dir, tokens, 8, [1, 2], 8)
    b = _cache(base / "rb", teacher_b, tokens, 5, [1], 6)
    mask = np.ones((ROWS, SEQ), dtype=bool)
    mask[:, -1] = False
    mask[2, :5] = False
    b = copy_with_loss_mask(b, base / "b-masked", mask)
    return {
        "a": a,
        "b": b,
        "b_mask": mask,
        "c": _cache(base / "rc", teacher_c, tokens, 5, [1], 8),
        "a_other": _cache(base / "ro", tiny_teacher_dir, base / "other.npy", 8, [1, 2], 8),
        "b_other": _cache(base / "rbo", teacher_b, base / "other.npy", 5, [1], 6),
    }


def _expect_sample(sample: dict[str, torch.Tensor], a: TeacherCache, b: TeacherCache) -> None:
    row = int(sample["row"])
    want_a, want_b = a[row], b[row]
    torch.testing.assert_close(sample["input_ids"], want_a["input_ids"])
    for key in ("topk_logprobs", "topk_indices", "topk_logsumexp", "temperatures"):
        torch.testing.assert_close(sample[f"teacher0_{key}"], want_a[key])
        torch.testing.assert_close(sample[f"teacher1_{key}"], want_b[key])
    torch.testing.assert_close(sample["loss_mask"], want_a["loss_mask"] & want_b["loss_mask"])


def test_dataset_reads_each_teacher_for_the_same_rows(caches: dict[str, Any]) -> None:
    ds = CacheDataset(
        [caches["a"], caches["b"]], fields=["input_ids", "topk"], weights=[3, 1], seed=4
    )
    a, b = TeacherCache(caches["a"]), TeacherCache(caches["b"])
    samples = list(ds)
    assert sorted(int(s["row"]) for s in samples) == list(range(ROWS))
    assert [int(s["row"]) for s in samples] != list(range(ROWS))  # shuffled by the first cache
    for s in samples:
        _expect_sample(s, a, b)
        assert s["teacher0_topk_indices"].shape == (SEQ, 8)
        assert s["teacher1_topk_indices"].shape == (SEQ, 5)
        torch.testing.assert_close(s["teacher_weights"], torch.tensor([0.75, 0.25]))
    row2 = next(s for s in samples if int(s["row"]) == 2)
    assert not row2["loss_mask"][:5].any() and row2["loss_mask"][5:-1].all()
    assert "topk_logprobs" not in samples[0]  # every teacher key carries its teacher


def test_loader_batches_feed_the_mixture_loss(caches: dict[str, Any]) -> None:
    ds = CacheDataset([caches["a"], caches["b"]], fields=["topk", "hidden_1"], batch_size=4)
    batch = next(iter(ds.loader()))
    assert batch["teacher_weights"].shape == (4, 2)
    assert batch["teacher1_hidden_1"].dtype == torch.bfloat16
    student = torch.randn(4, SEQ, 320, dtype=torch.float64, requires_grad=True)
    loss = losses.kd_loss(student, batch, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.grad is not None and student.grad[~batch["loss_mask"]].abs().sum() == 0
    # each single teacher's loss differs from the mixture's
    for j in range(2):
        single = losses.kd_loss(student.detach(), teacher_view(batch, j), temperature=2.0)
        assert abs(float(single - loss.detach())) > 1e-4


def test_multicache_batch_matches_the_dataset(caches: dict[str, Any]) -> None:
    multi = MultiCache([caches["a"], caches["b"]], weights=[1, 1])
    assert len(multi) == ROWS and multi.manifest.vocab_size == 320
    got = multi.batch([7, 2, 11], ["input_ids", "topk"])
    a, b = TeacherCache(caches["a"]), TeacherCache(caches["b"])
    assert got["row"].tolist() == [7, 2, 11]
    for i in range(3):
        _expect_sample({k: v[i] for k, v in got.items()}, a, b)
    torch.testing.assert_close(got["teacher_weights"], torch.full((3, 2), 0.5))


def test_caches_over_other_rows_are_refused_naming_the_row(caches: dict[str, Any]) -> None:
    # same rows per shard (checksums differ in one shard) and different (rows compared)
    for first, second in ((caches["a"], caches["a_other"]), (caches["a"], caches["b_other"])):
        with pytest.raises(ManifestMismatchError, match="first differ at row 13") as err:
            CacheDataset([first, second], fields=["topk"])
        assert first in str(err.value) and second in str(err.value)
    with pytest.raises(ManifestMismatchError, match="row 13"):
        MultiCache([caches["a_other"], caches["b"]])


def test_different_vocabularies_are_refused(caches: dict[str, Any]) -> None:
    with pytest.raises(ManifestMismatchError, match="vocabularies differ") as err:
        CacheDataset([caches["a"], caches["c"]], fields=["topk"])
    assert "320" in str(err.value) and "330" in str(err.value) and caches["c"] in str(err.value)


def test_bad_weights_and_fields_are_refused(caches: dict[str, Any]) -> None:
    pair = [caches["a"], caches["b"]]
    with pytest.raises(ValueError, match="2 entries for 3 caches"):
        CacheDataset([*pair, caches["a"]], fields=["topk"], weights=[1, 2])
    with pytest.raises(ValueError, match="weights must be finite, >= 0"):
        MultiCache(pair, weights=[1, -1])
    with pytest.raises(ValueError, match="weights are for an ensemble"):
        CacheDataset(caches["a"], fields=["topk"], weights=[1])
    with pytest.raises(ValueError, match="at least one cache"):
        CacheDataset([], fields=["topk"])
    with pytest.raises(ValueError, match="field 'hidden_2' is not in this cache") as err:
        CacheDataset(pair, fields=["topk", "hidden_2"])
    assert caches["b"] in str(err.value)


def test_multicache_gives_every_teacher_the_fields_asked(caches: dict[str, Any]) -> None:
    ensemble = MultiCache([caches["a"], caches["b"]])
    assert set(ensemble.batch([0, 3], fields=[])) == {"row", "teacher_weights"}
    ids_only = ensemble.batch([0, 3], fields=["input_ids"])
    assert set(ids_only) == {"row", "input_ids", "teacher_weights"}
    everything = ensemble.batch([0, 3])  # None: each teacher's own fields
    assert {"teacher0_hidden_2", "teacher1_hidden_1", "teacher1_topk_logprobs"} <= set(everything)


def test_dataset_without_fields_gives_every_teacher_its_own_fields(caches: dict[str, Any]) -> None:
    """fields=None: all that each cache holds, whatever the order (as MultiCache does); a's
    layers are [1, 2], b's [1]."""
    for order in (("a", "b"), ("b", "a")):
        ds = CacheDataset([caches[k] for k in order], shuffle=False)
        sample = next(iter(ds))
        want = MultiCache([caches[k] for k in order]).batch([int(sample["row"])])
        assert set(sample) == set(want)
        j_a = order.index("a")
        assert {f"teacher{j_a}_hidden_1", f"teacher{j_a}_hidden_2"} <= set(sample)
        assert f"teacher{1 - j_a}_hidden_2" not in sample
        torch.testing.assert_close(
            sample[f"teacher{j_a}_hidden_2"], want[f"teacher{j_a}_hidden_2"][0]
        )
    with pytest.raises(ValueError, match="two or more caches; the source is one cache"):
        CacheDataset([caches["a"]], weights=[1])


def test_weights_are_normalised_without_overflow() -> None:
    assert check_weights([1e308, 1e308, 0], 3) == (0.5, 0.5, 0.0)  # their sum is inf
    assert check_weights([3, 1], 2) == (0.75, 0.25)
    assert check_weights(None, 4) == (0.25,) * 4
    assert check_weights(np.array([1.0, 3.0]), 2) == (0.25, 0.75)


@pytest.mark.parametrize("weights", [[True, False], [1, "2"], [np.bool_(True), 1.0]])
def test_weights_that_are_not_numbers_are_refused(weights: list[Any]) -> None:
    with pytest.raises(ValueError, match="weights must be numbers"):
        check_weights(weights, 2)


def test_resume_continues_the_ensemble_order(caches: dict[str, Any]) -> None:
    ds = CacheDataset([caches["a"], caches["b"]], fields=["topk"], seed=1)
    it = iter(ds)
    first = [int(next(it)["row"]) for _ in range(7)]
    state = ds.state_dict()
    rest = [int(s["row"]) for s in it]
    again = CacheDataset([caches["a"], caches["b"]], fields=["topk"], seed=1)
    again.load_state_dict(state)
    resumed = list(again)
    assert [int(s["row"]) for s in resumed] == rest and len(first) + len(rest) == ROWS
    assert all("teacher1_topk_logprobs" in s for s in resumed)


def test_kdtrainer_distils_from_an_ensemble(caches: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from kdcache.client import LayerMap
    from kdcache.client.hf import KDConfig, KDTrainer, causal_lm_loss

    seen: list[dict[str, torch.Tensor]] = []

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            seen.append(dict(inputs))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    model = LlamaForCausalLM(config).double()
    ds = CacheDataset([caches["a"], caches["b"]], fields=["input_ids", "topk"], weights=[1, 3])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, save_strategy="no")  # fmt: skip
    kd = KDConfig(temperature=2.0, alpha=0.25)
    trainer = Recording(model=model, args=args, train_dataset=ds, kd=kd)
    trainer.train()
    assert len(seen) == 2 and seen[0]["teacher_weights"].shape == (4, 2)
    batch = seen[-1]
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits
        mask = batch["loss_mask"]
        want = 0.25 * causal_lm_loss(logits, batch["input_ids"], mask)
        want = want + 0.75 * losses.kd_loss(logits, batch, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    hidden = KDConfig(layer_map=LayerMap({1: 1}))
    with pytest.raises(ValueError, match="ensemble of 2 caches"):
        KDTrainer(model=model, args=args, train_dataset=ds, kd=hidden)


def test_expect_checks_every_teacher_and_names_each_mismatch(caches: dict[str, Any]) -> None:
    a, b = caches["a"], caches["b"]  # a: top-8, layers [1, 2]; b: top-5, layers [1]
    CacheDataset([a, b], expect={"vocab_size": 320, "temperatures": [1.0, 2.0], "topk": 5})
    CacheDataset(a, expect={"topk": 8, "layers": [2]})  # a alone meets both
    with pytest.raises(ManifestMismatchError) as err:
        CacheDataset([a, b], expect={"topk": 8, "layers": [2]})
    text = str(err.value)
    assert f"teacher 1 ({b})" in text and "top-8" in text and "[2] are not cached" in text
    assert "teacher 0" not in text  # a meets both
    with pytest.raises(ManifestMismatchError, match=r"(?s)teacher 0 \(.*\).*\[2\] are not cached"):
        CacheDataset([b, a], expect={"layers": [2]})  # the order names the teacher


def test_expect_takes_one_cache_id_per_teacher(caches: dict[str, Any]) -> None:
    a, b = caches["a"], caches["b"]
    ids = [TeacherCache(a).manifest.cache_id, TeacherCache(b).manifest.cache_id]
    CacheDataset([a, b], expect={"cache_id": ids})
    CacheDataset([a, b], expect={"cache_id": [None, ids[1]]})
    with pytest.raises(ValueError, match=r"expect\['cache_id'\]: an ensemble of 2 caches"):
        CacheDataset([a, b], expect={"cache_id": ids[0]})
    with pytest.raises(ManifestMismatchError, match=r"(?s)teacher 1 .*cache_id"):
        CacheDataset([a, b], expect={"cache_id": [ids[0], ids[0]]})
