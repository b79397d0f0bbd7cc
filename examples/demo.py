#!/usr/bin/env python
"""kdcache end to end on a CPU: train a small teacher, cache it once, distil three students.

What ``make demo`` runs (about 2-3 minutes on 2 cores, no network):

1. train a byte-level BPE and a 4-layer Llama teacher on the documentation that ships with
   Python itself (``pydoc_data.topics``), holding out 10% of the topics;
2. write the training tokens (N, T) and a job spec, and cache the teacher's top-k log-probs,
   log-normalisers and two hidden layers with the real CLI, ``kdcache run``;
3. train the same 2-layer student three ways from the cache alone, with the same seed and batches:
   hard labels; hard labels + top-k KD; hard labels + KD + hidden-state matching;
4. print the cache's size, the teacher pass's speed and every model's held-out loss.

Usage: ``python examples/demo.py [--out demo-out] [--keep] [--tiny] [--seed 0]
[--hidden-codec exact|int8|fp8|pca:R]``.
``--tiny`` shrinks everything (for the smoke test); the numbers then mean little.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Sizes:
    """Every knob of the demo; ``FULL`` is what ``make demo`` runs."""

    vocab: int = 1024
    seq_len: int = 128
    teacher_dim: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 600
    teacher_lr: float = 3e-3
    student_dim: int = 96
    student_layers: int = 2
    student_steps: int = 300
    student_lr: float = 3e-3
    batch: int = 16
    topk: int = 32
    kd_temperature: float = 2.0
    kd_weight: float = 1.0
    hidden_weight: float = 1.0
    topics: int | None = None  # None: all of them


FULL = Sizes()
TINY = Sizes(
    vocab=384,
    seq_len=64,
    teacher_dim=64,
    teacher_steps=30,
    student_dim=32,
    student_steps=20,
    batch=8,
    topk=16,
    topics=12,
)
MODES = ("hard", "kd", "kd+hidden")
MODE_LABELS = {
    "hard": "hard labels",
    "kd": "hard + top-k KD",
    "kd+hidden": "hard + KD + hidden",
}


def header(text: str) -> None:
    print(f"\n== {text}", flush=True)


# ---------------------------------------------------------------- data


def split_topics(seed: int, limit: int | None, holdout: float = 0.1) -> tuple[list[str], list[str]]:
    """The stdlib's doc topics, shuffled by ``seed``: (training texts, held-out texts)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(seed).shuffle(keys)
    keys = keys[:limit] if limit else keys
    n_val = max(1, round(len(keys) * holdout))
    return [topics[k] for k in keys[n_val:]], [topics[k] for k in keys[:n_val]]


def pack(tokenizer: Any, texts: Sequence[str], seq_len: int) -> np.ndarray:
    """Tokenise, join with EOS and cut into full rows: (N, seq_len) int32."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def llama(vocab: int, dim: int, layers: int, seq_len: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, dim // 32)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=3 * dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        eos_token_id=0,  # the ids toy.make_tokenizer gives its special tokens
        pad_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def batches(num_rows: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """Row indices of each step: epochs of seeded permutations, so every mode sees the same."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += rng.permutation(num_rows).tolist()
    return [np.asarray(order[i * batch : (i + 1) * batch]) for i in range(steps)]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits (B, T, V) predicting ids (B, T) shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.inference_mode()
def heldout_loss(model: nn.Module, rows: np.ndarray, batch: int = 32) -> float:
    """Mean next-token CE (nats/token) of ``model`` over rows (N, T)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids = torch.from_numpy(rows[i : i + batch]).long()
        n = ids[:, 1:].numel()
        total += float(next_token_loss(model(input_ids=ids).logits, ids)) * n
        count += n
    model.train()
    return total / count


def optimise(
    params: Sequence[nn.Parameter],
    steps: int,
    lr: float,
    step_loss: Callable[[int], torch.Tensor],
    desc: str = "training",
) -> float:
    """AdamW with linear warm-up and cosine decay over ``steps``; returns the last loss.

    Shows a progress bar with the loss on a terminal (none in logs or tests)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    loss = torch.zeros(())
    with tqdm(range(steps), desc=desc, unit="step", disable=None, leave=False) as bar:
        for step in bar:
            loss = step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    return float(loss.detach())


# ---------------------------------------------------------------- steps


def make_teacher(sizes: Sizes, seed: int, out: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train tokenizer + teacher on the training topics; save both to ``out/teacher``."""
    from transformers import PreTrainedTokenizerFast

    from kdcache.worker.toy import make_tokenizer

    train_texts, val_texts = split_topics(seed, sizes.topics)
    teacher_dir = make_tokenizer(out / "teacher", train_texts, vocab_size=sizes.vocab)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(teacher_dir))
    train, val = (
        pack(tokenizer, train_texts, sizes.seq_len),
        pack(tokenizer, val_texts, sizes.seq_len),
    )
    print(
        f"corpus: {len(train_texts)} training topics -> {train.shape[0]} rows x {sizes.seq_len}"
        f" tokens; {len(val_texts)} held-out topics -> {val.shape[0]} rows; vocab {len(tokenizer)}"
    )
    torch.manual_seed(seed)
    model = llama(len(tokenizer), sizes.teacher_dim, sizes.teacher_layers, sizes.seq_len)
    order = batches(len(train), sizes.batch, sizes.teacher_steps, seed + 1)

    def step_loss(step: int) -> torch.Tensor:
        ids = torch.from_numpy(train[order[step]]).long()
        return next_token_loss(model(input_ids=ids).logits, ids)

    t0 = time.perf_counter()
    last = optimise(
        list(model.parameters()), sizes.teacher_steps, sizes.teacher_lr, step_loss, "teacher"
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"teacher: Llama {sizes.teacher_layers} layers, d={sizes.teacher_dim}, "
        f"{n_params / 1e6:.1f}M params; {sizes.teacher_steps} steps in "
        f"{time.perf_counter() - t0:.0f}s, last training loss {last:.2f}"
    )
    model.save_pretrained(teacher_dir)
    return teacher_dir, train, val


def write_job(
    sizes: Sizes, out: Path, teacher_dir: Path, train: np.ndarray, hidden_codec: str = "exact"
) -> Path:
    """The training tokens as (N, T) int32 .npy and a job spec naming them; returns the spec."""
    tokens = out / "train_tokens.npy"
    np.save(tokens, train)
    spec = {
        "name": "kdcache-demo",
        "teacher": {"hf": str(teacher_dir.absolute()), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens.absolute())},
        "outputs": {
            "topk": sizes.topk,
            "temperatures": [1.0, 2.0],
            "hidden_layers": f"uniform:{sizes.student_layers}",
            "hidden_dtype": "bfloat16",
            **({"hidden_codec": hidden_codec} if hidden_codec != "exact" else {}),
        },
        "batch_size": 16,
        "rows_per_shard": 256,
    }
    job = out / "job.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"job spec: {job}")
    print(yaml.safe_dump(spec["outputs"], default_flow_style=True).strip())
    return job


def run_cache(job: Path, root: Path) -> tuple[str, float]:
    """``kdcache run JOB --root ROOT`` in a child process; (cache path, wall seconds)."""
    cmd = [sys.executable, "-m", "kdcache.cli", "run", str(job), "--root", str(root)]
    print("$ " + " ".join(["kdcache", *cmd[3:]]))
    t0 = time.perf_counter()
    # stderr passes through: the run's progress bar (a terminal) or progress lines (a log)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"kdcache run failed with exit code {proc.returncode}")
    return lines[-1], wall


def train_student(
    mode: str, cache: Any, sizes: Sizes, order: list[np.ndarray], seed: int
) -> nn.Module:
    """A fresh student (same init for every mode) trained on ``order``'s batches from the cache."""
    from kdcache.client import losses
    from kdcache.client.layermap import HiddenProjector, LayerMap

    m = cache.manifest
    torch.manual_seed(seed)
    student = llama(m.vocab_size, sizes.student_dim, sizes.student_layers, m.seq_len)
    params = list(student.parameters())
    fields = ["input_ids"]
    layer_map, projector = None, None
    if mode != "hard":
        fields.append("topk")
    if mode == "kd+hidden":
        fields.append("hidden")
        layer_map = LayerMap.from_manifest(m)
        # hidden_width: the teacher's d, or R for a pca:R cache (students map into its basis)
        projector = HiddenProjector(layer_map, sizes.student_dim, m.hidden_width)
        params += list(projector.parameters())

    # The demo's cache is small enough to read whole, once; a big one streams with CacheDataset.
    data = cache.batch(np.arange(m.num_rows), fields)

    def step_loss(step: int) -> torch.Tensor:
        rows = torch.from_numpy(order[step])
        batch = {k: v[rows] for k, v in data.items()}
        ids = batch["input_ids"]
        out = student(input_ids=ids, output_hidden_states=layer_map is not None)
        loss = next_token_loss(out.logits, ids)
        if mode != "hard":
            kd = losses.kd_loss(out.logits, batch, temperature=sizes.kd_temperature)
            loss = loss + sizes.kd_weight * kd
        if layer_map is not None:
            hid = losses.hidden_losses(
                out.hidden_states, batch, layer_map, projector=projector, kind="cosine"
            )
            loss = loss + sizes.hidden_weight * hid
        return loss

    optimise(params, sizes.student_steps, sizes.student_lr, step_loss, f"student {mode}")
    return student


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-out", help="work directory (default: demo-out)")
    p.add_argument("--keep", action="store_true", help="do not wipe the work directory first")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, help="override the teacher's training steps")
    p.add_argument("--student-steps", type=int, help="override each student's training steps")
    p.add_argument(
        "--hidden-codec",
        default="exact",
        help="outputs.hidden_codec of the cache: exact (default), int8, fp8 or pca:R",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else FULL
    if args.teacher_steps:
        sizes = replace(sizes, teacher_steps=args.teacher_steps)
    if args.student_steps:
        sizes = replace(sizes, student_steps=args.student_steps)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from kdcache.client.cache import TeacherCache

    t_start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    header("1/4 teacher: tokenizer + Llama trained on the Python docs (pydoc_data.topics)")
    teacher_dir, train, val = make_teacher(sizes, args.seed, out)

    header("2/4 job: training tokens + job spec")
    job = write_job(sizes, out, teacher_dir, train, args.hidden_codec)

    header("3/4 teacher pass: kdcache run (one forward per row, cached)")
    caches = out / "root" / "caches"
    before = {p.name for p in caches.iterdir()} if caches.is_dir() else set()
    cache_path, wall = run_cache(job, out / "root")
    if Path(cache_path).name in before:
        print("(--keep: this cache was already complete, so nothing was recomputed)")
    cache = TeacherCache(cache_path)
    n_tokens = cache.manifest.num_rows * cache.manifest.seq_len
    size = dir_bytes(cache_path)
    print(f"cache: {cache_path}")
    print(f"{cache!r}")

    header("4/4 students: trained from the cache alone, same init, steps and batches")
    order = batches(len(train), sizes.batch, sizes.student_steps, args.seed + 2)
    held: dict[str, float] = {}
    for mode in MODES:
        t0 = time.perf_counter()
        student = train_student(mode, cache, sizes, order, args.seed + 3)
        held[mode] = heldout_loss(student, val)
        print(
            f"student ({MODE_LABELS[mode]}): {sizes.student_steps} steps in "
            f"{time.perf_counter() - t0:.0f}s, held-out loss {held[mode]:.3f}"
        )
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    held_teacher = heldout_loss(teacher, val)

    header(f"results (seed {args.seed}, {time.perf_counter() - t_start:.0f}s in all)")
    print(f"cache size on disk            {size / 2**20:.2f} MiB")
    print(f"cache bytes/token             {size / n_tokens:.1f}  ({n_tokens:,} tokens cached)")
    print(
        f"teacher pass                  {wall:.1f} s  ({n_tokens / wall:,.0f} tokens/s, "
        "whole `kdcache run` incl. start-up and model load)"
    )
    print("held-out loss (nats/token, lower is better)")
    t_size = f"({sizes.teacher_layers} layers, d={sizes.teacher_dim})"
    s_size = f"({sizes.student_layers} layers, d={sizes.student_dim})"
    print(f"  {'teacher':<28}{held_teacher:.3f}  {t_size}")
    for mode in MODES:
        label = f"student {MODE_LABELS[mode]}"
        note = s_size if mode == "hard" else f"({held[mode] - held['hard']:+.3f} vs hard labels)"
        print(f"  {label:<28}{held[mode]:.3f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
