"""Train a small Hugging Face student from a kdcache teacher cache: top-k KD + hidden-state loss.

Runs on CPU or GPU, one process or many under torchrun (DDP; gloo on CPU, nccl on CUDA)::

    torchrun --standalone --nproc_per_node 2 examples/train_student.py --cache CACHE_DIR --steps 30

The teacher is never loaded: targets (top-k log-probabilities, the exact log-normaliser of each
cached temperature, hidden states of the cached layers) stream from the cache through
CacheDataset, each row once per epoch across ranks. The student is a LlamaForCausalLM sized by
the flags; its hidden states are matched to the teacher's through a LayerMap and learned
projections. ``--save``/``--resume`` checkpoint model, optimiser and the data position, so a
resumed run (on any world size with the same global batch) sees exactly the rows it had not seen.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.client import losses
from kdcache.client.dataset import CacheDataset
from kdcache.client.distributed import end_distributed
from kdcache.client.layermap import HiddenProjector, LayerMap


class Student(nn.Module):
    """A causal LM plus one projection per mapped layer (student width -> teacher width)."""

    def __init__(self, model: nn.Module, projector: HiddenProjector) -> None:
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, input_ids: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """input_ids (B, T) -> logits (B, T, V) and hidden states, a tuple of (B, T, d_s)."""
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        return out.logits, out.hidden_states


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="cache directory, s3:// or service URL")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4, help="rows per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=2.0, help="must be a cached one")
    p.add_argument(
        "--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"]
    )
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--hidden-kind", default="mse", choices=["mse", "cosine"])
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-dim", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="crop rows to this many tokens")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write a checkpoint here at the end")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    return p.parse_args()


def setup() -> tuple[int, int, torch.device]:
    """Rank, world size and device; starts the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def build_student(args: argparse.Namespace, dataset: CacheDataset, layer_map: LayerMap) -> Student:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = dataset.manifest
    heads = 2 if args.student_dim % 2 == 0 else 1
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=args.student_dim,
        intermediate_size=2 * args.student_dim,
        num_hidden_layers=args.student_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(m.seq_len, 16),
    )
    model = LlamaForCausalLM(config)
    if m.hidden_size is None:
        raise SystemExit("this example needs a cache with hidden layers")
    # hidden_width: d, or R for a pca:R cache (whose batches carry R-wide codes)
    return Student(model, HiddenProjector(layer_map, args.student_dim, m.hidden_width))


def mean_across_ranks(value: Tensor, world: int) -> float:
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def main() -> None:
    args = parse_args()
    rank, world, device = setup()
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    probe = CacheDataset(args.cache, fields=["input_ids"])
    m = probe.manifest
    layer_map = LayerMap.from_manifest(m)
    if max(layer_map.student_layers) > args.student_layers:
        layer_map = LayerMap.uniform(args.student_layers, int(m.teacher["num_layers"]))
    layer_map.check(m.hidden_layers)
    fields = ["input_ids", "topk", *(f"hidden_{t}" for t in sorted(set(layer_map.teacher_layers)))]
    dataset = CacheDataset(
        args.cache,
        fields=fields,
        seed=args.seed,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        expect={"temperatures": [args.temperature], "layers": list(layer_map.teacher_layers)},
    )
    student = build_student(args, dataset, layer_map).to(device)
    ddp: nn.Module = DistributedDataParallel(student) if world > 1 else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    step = 0
    if args.resume:
        ckpt: dict[str, Any] = torch.load(args.resume, map_location=device, weights_only=False)
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        dataset.load_state_dict(ckpt["data"])
        step = ckpt["step"]
    if rank == 0:
        print(
            f"cache {m.cache_id}: {m.num_rows} rows x {m.seq_len} tokens, top-{m.topk}, "
            f"layers {m.hidden_layers}; world {world}, {len(dataset)} rows/rank/epoch, "
            f"padded {dataset.padded_rows}; layer map {layer_map.pairs}",
            flush=True,
        )
    t0 = time.perf_counter()
    while step < args.steps:
        dataset.set_epoch(dataset.epoch)  # keeps a resumed position; next epochs advance below
        for batch in dataset.loader(num_workers=args.workers, pin_memory=device.type == "cuda"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits, hidden = ddp(batch["input_ids"])
            kd = losses.kd_loss(
                logits, batch, temperature=args.temperature, divergence=args.divergence
            )
            feat = losses.hidden_losses(
                hidden, batch, layer_map, projector=student.projector, kind=args.hidden_kind
            )
            loss = kd + args.hidden_weight * feat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            shown = [mean_across_ranks(x, world) for x in (loss, kd, feat)]
            if rank == 0:
                print(
                    f"step {step} loss {shown[0]:.5f} kd {shown[1]:.5f} hidden {shown[2]:.5f} "
                    f"epoch {dataset.epoch}",
                    flush=True,
                )
            if step >= args.steps:
                break
        else:
            dataset.set_epoch(dataset.epoch + 1)
    if rank == 0:
        print(f"done {step} steps in {time.perf_counter() - t0:.1f}s", flush=True)
        if args.save:
            torch.save(
                {
                    "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "data": dataset.state_dict(),
                    "step": step,
                },
                args.save,
            )


if __name__ == "__main__":
    main()
    end_distributed()  # after main: the DDP model is gone, then the process group
