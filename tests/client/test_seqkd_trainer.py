"""A student distilled from a sequence-level KD cache (the teacher's own continuations) through
``KDTrainer``: trained on the generated positions only, and its KD loss goes down."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.client import CacheDataset, losses
from kdcache.core.spec import parse_spec
from kdcache.worker import toy
from kdcache.worker.runner import run_job

pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from kdcache.client.hf import KDConfig, KDTrainer  # noqa: E402


@pytest.fixture(scope="module")
def seqkd_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> str:
    data = tmp_path_factory.mktemp("prompts")
    toy.make_tokens(data / "prompts.npy", 16, 6, 320, seed=11)
    spec = {
        "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(data / "prompts.npy")},
        "outputs": {"topk": 16, "temperatures": [1.0, 2.0]},
        "batch_size": 8,
        "rows_per_shard": 8,
        "generate": {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "seed": 1},
    }
    return run_job(parse_spec(spec), tmp_path_factory.mktemp("root"))


def test_a_student_trains_on_the_generations_and_its_kd_loss_falls(
    seqkd_cache: str, tmp_path: Path
) -> None:
    record: list[tuple[float, bool]] = []

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            kd = losses.kd_loss(outputs.logits.detach(), inputs, temperature=2.0)
            mask = inputs["loss_mask"]
            # only generated positions train: never the 5 prompt-internal ones
            record.append((float(kd), bool(mask.any() and not mask[:, :5].any())))
            return (loss, outputs) if return_outputs else loss

    ds = CacheDataset(seqkd_cache, fields=["input_ids", "topk"], seed=0)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=ds.manifest.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=ds.manifest.seq_len,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        per_device_train_batch_size=4, num_train_epochs=8, learning_rate=1e-2,
        save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    kd = KDConfig(temperature=2.0, alpha=0.0)
    Recording(model=LlamaForCausalLM(config), args=args, train_dataset=ds, kd=kd).train()
    kds = np.array([k for k, _ in record])
    assert len(record) == 32 and all(ok for _, ok in record)
    first, last = kds[:4].mean(), kds[-4:].mean()  # one epoch each: the same 16 rows
    assert last < 0.8 * first, (first, last, kds.round(3).tolist())
