"""Distil a state-space student (Mamba, from transformers) from a transformer teacher's cache.

The student is a randomly initialised ``MambaForCausalLM`` (or ``Mamba2ForCausalLM``) with the
cache's vocabulary: no attention, a selective-scan recurrence instead. Nothing of the teacher's
architecture is needed: the cache gives top-k log-probabilities with the exact log-normaliser
(for ``kd_loss``) and hidden states of the cached layers, matched through learned projections::

    python examples/ssm_student.py --cache CACHE_DIR --steps 200
    python examples/ssm_student.py --demo runs/ssm      # builds a tiny teacher and its cache first

By default the teacher layer of each student layer is learned (``LearnedLayerMap``: a softmax over
all cached layers, annealed and then fixed), since a Mamba block need not line up with any one
transformer block; ``--layer-map uniform`` pairs them evenly instead. Runs on CPU in minutes
(transformers' pure-PyTorch scan; on CUDA install ``mamba-ssm`` and ``causal-conv1d`` for its
kernels). Prints one line per step and, at the end, the chosen teacher layers and their weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcache.client import CacheDataset, HiddenProjector, LayerMap, LearnedLayerMap, losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", help="cache directory, s3:// or service URL (with hidden layers)")
    src.add_argument("--demo", help="make a tiny Llama teacher, its data and cache in this folder")
    p.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature (a cached one)")
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--hidden-kind", choices=["mse", "cosine"], default="cosine")
    p.add_argument("--layer-map", choices=["learned", "uniform"], default="learned")
    p.add_argument("--layers", type=int, default=2, help="student Mamba blocks")
    p.add_argument("--dim", type=int, default=64, help="student width")
    p.add_argument("--state-size", type=int, default=16, help="SSM state per channel")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_demo_cache(folder: Path, seed: int) -> str:
    """A 4-layer Llama teacher (random init), 256 rows of 64 tokens and its cache (embedded run,
    top-16, hidden layers 1-4); returns the cache path (the run's last stdout line)."""
    import numpy as np
    import yaml

    from kdcache.worker import toy

    vocab = 512
    teacher = toy.make_tiny_teacher(
        folder / "teacher", vocab_size=vocab, hidden_size=64, num_layers=4, seed=seed
    )
    rng = np.random.default_rng(seed)
    # repeated phrases, so that there is structure for a student to learn
    phrases = rng.integers(3, vocab, size=(32, 8))
    rows = phrases[rng.integers(0, len(phrases), size=(256, 8))].reshape(256, 64)
    np.save(folder / "tokens.npy", rows.astype(np.int32))
    spec = {
        "name": "ssm-student-demo",
        "teacher": {"hf": str(teacher), "device": "cpu"},
        "dataset": {"tokens": str(folder / "tokens.npy")},
        "outputs": {"topk": 16, "temperatures": [1.0], "hidden_layers": [1, 2, 3, 4]},
        "batch_size": 32,
        "rows_per_shard": 64,
    }
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    run = [sys.executable, "-m", "kdcache.cli", "run", str(job), "--root", str(folder / "root")]
    out = subprocess.run(run, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def ssm_student(arch: str, vocab: int, dim: int, layers: int, state: int) -> nn.Module:
    """A randomly initialised Mamba (or Mamba-2) causal LM."""
    if arch == "mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        head_dim = 16
        config2 = Mamba2Config(
            vocab_size=vocab,
            hidden_size=dim,
            num_hidden_layers=layers,
            state_size=state,
            expand=2,
            head_dim=head_dim,
            num_heads=2 * dim // head_dim,
            n_groups=1,
            chunk_size=64,
        )
        return Mamba2ForCausalLM(config2)
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, state_size=state, expand=2
    )
    return MambaForCausalLM(config)


def layer_mapping(
    args: argparse.Namespace, manifest: Any
) -> tuple[LayerMap | LearnedLayerMap, HiddenProjector | None]:
    """The layer map and its projections (None for the learned map: it holds its own)."""
    cached = [t for t in manifest.hidden_layers if t != 0]
    if not cached or manifest.hidden_width is None:
        raise SystemExit("this example needs a cache with hidden layers (outputs.hidden_layers)")
    students = list(range(1, args.layers + 1))
    if args.layer_map == "learned":
        learned = LearnedLayerMap.for_cache(
            manifest, students, args.dim, temperature=1.0, anneal_to=0.05, harden_at=0.8
        )
        return learned, None
    # student block i <- the cached layer at the same relative depth
    fixed = LayerMap([(s, cached[round(s * len(cached) / args.layers) - 1]) for s in students])
    return fixed, HiddenProjector(fixed, args.dim, manifest.hidden_width, always=True)


def train(args: argparse.Namespace, cache: str) -> list[dict[str, float]]:
    """Distil; returns one dict of losses per step."""
    torch.manual_seed(args.seed)
    probe = CacheDataset(cache, fields=["input_ids"])
    m = probe.manifest
    layer_map, projector = layer_mapping(args, m)
    hidden = [f"hidden_{t}" for t in sorted(set(layer_map.teacher_layers))]
    dataset = CacheDataset(
        cache, fields=["input_ids", "topk", *hidden], seed=args.seed, batch_size=args.batch_size
    )
    student = ssm_student(args.arch, m.vocab_size, args.dim, args.layers, args.state_size)
    # the projections train with the student: the learned map's (it is a module) or the fixed map's
    heads = layer_map if isinstance(layer_map, LearnedLayerMap) else projector
    params = [*student.parameters(), *(heads.parameters() if heads is not None else [])]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    n_params = sum(p.numel() for p in student.parameters())
    print(
        f"cache {m.cache_id}: {m.num_rows} rows x {m.seq_len} tokens, top-{m.topk}, teacher "
        f"layers {list(m.hidden_layers)} (d={m.hidden_size}); student {type(student).__name__} "
        f"{args.layers} blocks, d={args.dim}, {n_params:,} parameters; layer map {args.layer_map}",
        flush=True,
    )
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    while len(history) < args.steps:
        for batch in dataset.loader():
            if isinstance(layer_map, LearnedLayerMap):
                layer_map.anneal(len(history) / args.steps)
            out = student(input_ids=batch["input_ids"], output_hidden_states=True)
            kd = losses.kd_loss(out.logits, batch, temperature=args.temperature)
            feat = losses.hidden_losses(
                out.hidden_states, batch, layer_map, projector=projector, kind=args.hidden_kind
            )
            loss: Tensor = kd + args.hidden_weight * feat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"loss": loss.item(), "kd": kd.item(), "hidden": feat.item()})
            shown = " ".join(f"{k} {v:.5f}" for k, v in history[-1].items())
            print(f"step {len(history)} {shown}", flush=True)
            if len(history) >= args.steps:
                break
        dataset.set_epoch(dataset.epoch + 1)
    print(f"done {len(history)} steps in {time.perf_counter() - t0:.1f}s", flush=True)
    if isinstance(layer_map, LearnedLayerMap):
        for s, row in layer_map.weights().items():
            shown = ", ".join(f"{t}: {w:.3f}" for t, w in row.items())
            print(f"student block {s} <- teacher layer {layer_map.selected()[s]} ({shown})")
    else:
        print(f"student block <- teacher layer: {dict(layer_map.pairs)}")
    return history


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = args.cache
    if cache is None:
        folder = Path(args.demo)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"building a tiny teacher and its cache under {folder}", flush=True)
        cache = make_demo_cache(folder, args.seed)
    history = train(args, cache)
    head, tail = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10) :]
    for key in ("kd", "hidden"):
        first = sum(h[key] for h in head) / len(head)
        last = sum(h[key] for h in tail) / len(tail)
        print(f"{key} loss {first:.4f} -> {last:.4f} (mean of the first and last tenth of steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
