"""Distil a Hugging Face student from a kdcache cache with ``transformers.Trainer`` (KDTrainer).

Runs on CPU (gloo) or GPU (nccl), in one process or many::

    torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py --cache CACHE_DIR --out runs/hf

The student is a small LlamaForCausalLM (random init, the cache's vocabulary) trained with
``alpha * CE + (1 - alpha) * KD`` (plus a hidden-state loss with ``--hidden-layers``). The teacher
is never loaded: its top-k log-probabilities, exact log-normalisers and hidden states stream from
the cache through CacheDataset; each row is trained once per epoch over all ranks. Checkpoints go to
``--out`` every ``--save-steps`` steps and hold the data position; ``--resume`` continues from the
last one with exactly the rows the interrupted run had not trained.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from kdcache.client import CacheDataset, LayerMap
from kdcache.client.hf import KDConfig, KDTrainer, end_distributed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="cache directory, s3:// or service URL")
    p.add_argument("--out", default="runs/hf-student", help="Trainer output_dir (checkpoints)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=4, help="rows per rank per micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=2.0, help="must be a cached one")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label CE")
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--hidden-layers", default="", help="e.g. '2:4' = student 2 -> teacher 4")
    p.add_argument("--dim", type=int, default=32, help="student width")
    p.add_argument("--layers", type=int, default=2, help="student blocks")
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def student_for(cache: CacheDataset, dim: int, layers: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with the cache's vocabulary and sequence length."""
    m = cache.manifest
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=m.seq_len,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    a = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pairs = [tuple(int(x) for x in p.split(":")) for p in a.hidden_layers.split(",") if p]
    layer_map = LayerMap(pairs) if pairs else None
    fields = ["input_ids", "topk"]
    if layer_map is not None:
        fields += [f"hidden_{t}" for t in sorted(set(layer_map.teacher_layers))]
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.accumulate,
        num_train_epochs=a.epochs,
        learning_rate=a.lr,
        logging_steps=1,
        save_strategy="steps",
        save_steps=a.save_steps,
        report_to=[],
        seed=a.seed,
        disable_tqdm=True,
    )
    # Built after the TrainingArguments here; before works as well: KDTrainer tells the dataset
    # its rank, world size and batch size.
    dataset = CacheDataset(a.cache, fields=fields, shuffle=True, seed=a.seed)
    torch.manual_seed(a.seed)
    trainer = KDTrainer(
        model=student_for(dataset, a.dim, a.layers),
        args=args,
        train_dataset=dataset,
        kd=KDConfig(
            temperature=a.temperature,
            alpha=a.alpha,
            divergence=a.divergence,
            layer_map=layer_map,
        ),
    )
    trainer.train(resume_from_checkpoint=a.resume or None)
    if args.process_index == 0:
        history = [h for h in trainer.state.log_history if "kd_loss" in h]
        if history:
            first, last = history[0], history[-1]
            print(f"steps {trainer.state.global_step} kd_loss {first['kd_loss']:.4f} -> "
                  f"{last['kd_loss']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
    end_distributed()  # after main: the Trainer is gone, then the process group
