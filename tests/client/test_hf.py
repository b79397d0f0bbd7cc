"""KDTrainer's loss against float64 references on the masked positions, its configuration errors,
the dataset's late partitioning, and the example run in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dataset_support import SEQ_LEN, copy_with_loss_mask, rows

from kdcache.client import CacheDataset, LayerMap, TeacherCache, losses

pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from kdcache.client.hf import KDConfig, KDTrainer, causal_lm_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def student(vocab: int, dim: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def masked(cache_dir37: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    mask = np.random.default_rng(5).random((37, SEQ_LEN)) < 0.6
    mask[:, -1] = False
    return copy_with_loss_mask(cache_dir37, tmp_path_factory.mktemp("m") / "c", mask), mask


def test_causal_lm_loss_equals_float64_reference_on_the_mask() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.5
    mask[0, 0] = True
    terms = [
        -torch.log_softmax(logits[b, j], -1)[ids[b, j + 1]]
        for b in range(3) for j in range(6) if mask[b, j]
    ]  # fmt: skip
    torch.testing.assert_close(causal_lm_loss(logits, ids, mask), torch.stack(terms).mean())
    everything = [
        -torch.log_softmax(logits[b, j], -1)[ids[b, j + 1]] for b in range(3) for j in range(6)
    ]
    torch.testing.assert_close(causal_lm_loss(logits, ids), torch.stack(everything).mean())


def test_compute_loss_combines_the_masked_terms(
    masked: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    url, mask = masked
    ds = CacheDataset(url, fields=["input_ids", "topk", "hidden_2"], shuffle=False)
    kd = KDConfig(temperature=2.0, alpha=0.3, layer_map=LayerMap({1: 2}), hidden_weight=0.7,
                  hidden_kind="cosine")  # fmt: skip
    model = student(ds.manifest.vocab_size).double()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = KDTrainer(model=model, args=args, train_dataset=ds, kd=kd)
    batch = TeacherCache(url).batch([0, 7, 30], ["input_ids", "topk", "hidden_2"])
    got = trainer.compute_loss(model, batch)
    m = torch.from_numpy(mask[[0, 7, 30]])
    assert torch.equal(batch["loss_mask"], m)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], output_hidden_states=True)
        logits = out.logits
        ce = torch.stack([
            -torch.log_softmax(logits[b, j], -1)[batch["input_ids"][b, j + 1]]
            for b in range(3) for j in range(SEQ_LEN - 1) if m[b, j]
        ]).mean()  # fmt: skip
        picked = {k: v[m][None] for k, v in batch.items() if k.startswith("topk")}
        picked["temperatures"] = batch["temperatures"]
        kd_ref = losses.kd_loss(logits[m][None], picked, temperature=2.0)
        s = model.kd_projector[1](out.hidden_states[1])[m]
        t = batch["hidden_2"].double()[m]
        hid = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
    want = 0.3 * ce + 0.7 * kd_ref + 0.7 * hid
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


def test_config_and_field_errors_name_every_problem(cache_dir37: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        KDConfig(temperature=0, alpha=1.5, divergence="kl", tail="x", hidden_kind="l1")
    for word in ("temperature", "alpha", "divergence", "tail", "hidden_kind"):
        assert word in str(err.value)
    ds = CacheDataset(cache_dir37, fields=["input_ids"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="topk_logprobs"):
        KDTrainer(model=student(320), args=args, train_dataset=ds, kd=KDConfig(alpha=0.5))
    hidden = KDConfig(layer_map=LayerMap({1: 1}))
    with pytest.raises(ValueError, match="hidden_1"):
        KDTrainer(model=student(320), args=args, train_dataset=ds, kd=hidden)


def test_set_partition_equals_building_with_the_layout(cache_dir37: str) -> None:
    late = CacheDataset(cache_dir37, fields=["input_ids"], seed=2)
    assert (late.rank, late.world_size) == (0, 1)
    late.set_partition(1, 3, 4)
    early = CacheDataset(cache_dir37, fields=["input_ids"], seed=2, rank=1, world_size=3,
                         batch_size=4)  # fmt: skip
    assert rows(iter(late)) == rows(iter(early)) and len(late) == len(early)
    with pytest.raises(ValueError, match="rank 3"):
        late.set_partition(3, 3)


def test_example_runs_in_one_process(cache_dir37: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--cache", cache_dir37,
           "--out", str(tmp_path), "--epochs", "1", "--hidden-layers", "1:2", "--lr", "1e-2",
           "--save-steps", "5"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "steps 10 kd_loss" in done.stdout, done.stdout[-2000:]
    assert (tmp_path / "checkpoint-10" / "kdcache_dataset.json").is_file()


def test_a_second_train_call_starts_the_data_over(cache_dir37: str, tmp_path: Path) -> None:
    seen: list[list[int]] = []

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            seen.append(inputs["row"].tolist())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    ds = CacheDataset(cache_dir37, fields=["input_ids", "topk"], seed=4)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3,
                             per_device_train_batch_size=5, save_strategy="no")  # fmt: skip
    trainer = Recording(model=student(320), args=args, train_dataset=ds)
    trainer.train()
    first = list(seen)
    trainer.train()
    order = ds.epoch_order(0).all_rows().tolist()
    assert first == seen[3:] == [order[i : i + 5] for i in range(0, 15, 5)]
