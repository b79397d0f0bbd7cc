"""``KDConfig(targets=...)``: KDTrainer trains on sampled or hybrid targets through ``kd_loss``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcache.client import CacheDataset, TeacherCache, losses
from kdcache.core.spec import parse_spec
from kdcache.worker.runner import run_job

pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from kdcache.client.hf import KDConfig, KDTrainer  # noqa: E402


@pytest.fixture(scope="module")
def sampled(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> str:
    spec = {
        "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": 4, "temperatures": [1.0, 2.0], "sample_draws": 16},
        "rows_per_shard": 4,
    }
    return run_job(parse_spec(spec), tmp_path_factory.mktemp("hf-targets"))


def _student(vocab: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len,
    )  # fmt: skip
    return LlamaForCausalLM(config).double()


@pytest.mark.parametrize("targets", ["sample", "topk+sample"])
def test_compute_loss_passes_targets_to_kd_loss(sampled: str, tmp_path: Path, targets: str) -> None:
    cache = TeacherCache(sampled)
    m = cache.manifest
    fields = ["input_ids", "topk", "sample"]
    ds = CacheDataset(sampled, fields=fields, shuffle=False)
    model = _student(m.vocab_size, m.seq_len)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    kd = KDConfig(temperature=2.0, alpha=0.0, targets=targets)
    trainer = KDTrainer(model=model, args=args, train_dataset=ds, kd=kd)
    batch = cache.batch([0, 3, 5], fields)
    got = trainer.compute_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    want = losses.kd_loss(logits, batch, 2.0, mask=batch["loss_mask"], targets=targets)
    topk = losses.kd_loss(logits, batch, 2.0, mask=batch["loss_mask"], targets="topk")
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)
    assert abs(float(want - topk)) > 1e-6  # a trainer ignoring targets would give this


def test_targets_choose_fields_and_are_checked(sampled: str, tmp_path: Path) -> None:
    assert "sample_counts" in KDConfig(targets="sample").fields()
    assert "topk_logprobs" not in KDConfig(targets="sample").fields()
    assert "topk_logsumexp" in KDConfig(targets="sample", temperature=2.0).fields()
    assert "sample_counts" not in KDConfig().fields()
    with pytest.raises(ValueError) as err:
        KDConfig(targets="draws")
    assert "targets" in str(err.value)
    with pytest.raises(ValueError, match="forward KL"):
        KDConfig(targets="topk+sample", divergence="reverse_kl")
    ds = CacheDataset(sampled, fields=["input_ids", "topk"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = _student(ds.manifest.vocab_size, ds.manifest.seq_len)
    with pytest.raises(ValueError, match="sample_indices"):
        KDTrainer(model=model, args=args, train_dataset=ds, kd=KDConfig(targets="sample"))
