"""A KDTrainer run for tests/client/test_hf_trainer.py, under torchrun or alone (CPU, gloo).

Each rank appends one JSON line per micro-batch to ``OUT/rows-rank<R>.jsonl``: the optimiser step
the batch belongs to, the rows it held and the KD loss (T=2) of the student before that update.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--build", choices=["before", "after"], default="before")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--dispatch", choices=["true", "false", "default"], default="default")
    p.add_argument("--hidden", action="store_true")
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--resume", default=None)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from kdcache.client import CacheDataset, LayerMap, losses
    from kdcache.client.hf import KDConfig, KDTrainer

    fields = ["input_ids", "topk"] + (["hidden_2"] if a.hidden else [])

    def dataset() -> CacheDataset:
        return CacheDataset(a.cache, fields=fields, shuffle=True, seed=3)

    ds = dataset() if a.build == "before" else None
    accel: dict[str, Any] = {}
    if a.dispatch != "default":
        accel["dispatch_batches"] = a.dispatch == "true"
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.accum,
        num_train_epochs=a.epochs,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        accelerator_config=accel or None,
    )
    if ds is None:
        ds = dataset()
    torch.manual_seed(0)
    m = ds.manifest
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=m.seq_len,
    )
    rank = int(os.environ.get("RANK", "0"))
    record = Path(a.out) / f"rows-rank{rank}.jsonl"

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            kd = losses.kd_loss(outputs.logits.detach(), inputs, temperature=2.0)
            mask = inputs["loss_mask"]
            line = {
                "step": self.state.global_step,
                "rows": inputs["row"].tolist(),
                "kd": float(kd),
                "mask_ok": bool(mask[:, :-1].all() and not mask[:, -1].any()),
            }
            with record.open("a") as f:
                f.write(json.dumps(line) + "\n")
            return (loss, outputs) if return_outputs else loss

    kd = KDConfig(
        temperature=2.0,
        alpha=a.alpha,
        layer_map=LayerMap({1: 2}) if a.hidden else None,
        hidden_weight=0.5,
    )
    trainer = Recording(model=LlamaForCausalLM(config), args=args, train_dataset=ds, kd=kd)
    trainer.train(resume_from_checkpoint=a.resume)


if __name__ == "__main__":
    main()
    from kdcache.client.hf import end_distributed

    end_distributed()
