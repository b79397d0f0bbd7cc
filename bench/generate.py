#!/usr/bin/env python
"""Throughput of a sequence-level KD job's generation (``generate:`` jobs), side by side.

On one random Llama (``--dim``, ``--layers``, ``--vocab``) and the same prompts (``--rows`` of
``--prompt-len`` tokens, real lengths drawn between half and all of it), prints the generated
tokens per second of:

- ``kdcache``: :func:`kdcache.worker.generate.generate_rows`, i.e. Hugging Face ``generate``
  with its KV cache, ``--batch`` left-padded prompts at a time (greedy, then sampled);
- ``hf batch 1``: ``generate`` on each prompt alone (no padding, no batching);
- ``hf sampled``: ``generate``'s own batched sampling (same batches; not seeded per row);
- ``no kv cache``: a batched greedy loop that runs the whole prefix again at every step;

and, for a whole ``kdcache run`` of the job (generation, then the teacher pass over prompt +
continuation, then the writes), its tokens per second and the share of its time generating.
Each is timed ``--reps`` times, the best kept (a shared machine's steadier number).

Usage: ``python bench/generate.py [--rows 32] [--new 64] [--batch 8] [--device cpu] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64, help="max_new_tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: up to 4)")
    return p.parse_args()


def best(fn: Any, reps: int, device: torch.device) -> tuple[float, Any]:
    """The shortest of ``reps`` runs of ``fn()`` in seconds, and its last result."""
    times, out = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def left_padded(prompts: np.ndarray, lengths: np.ndarray, dev: Any) -> tuple[Any, Any]:
    """(ids, attention_mask) of prompts left-padded to the longest (pad id 1)."""
    width = int(lengths.max())
    ids = torch.ones((len(lengths), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.from_numpy(prompts[i, :n])
        attn[i, width - n :] = 1
    return ids.to(dev), attn.to(dev)


def hf_sampled(model: Any, prompts: np.ndarray, lengths: np.ndarray, args: Any) -> None:
    """HF's own batched sampling (one torch generator for the batch: not seeded per row)."""
    for s in range(0, len(prompts), args.batch):
        part = slice(s, s + args.batch)
        ids, attn = left_padded(prompts[part], lengths[part], model.device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.8,
                           top_p=0.95, top_k=0, max_new_tokens=args.new,
                           min_new_tokens=args.new, pad_token_id=1)  # fmt: skip


def no_cache_greedy(model: Any, prompts: np.ndarray, lengths: np.ndarray, args: Any) -> int:
    """Batched greedy without a KV cache: the whole (left-padded) prefix runs at every step."""
    made = 0
    dev = model.device
    for s in range(0, len(prompts), args.batch):
        lens = lengths[s : s + args.batch]
        ids, attn = left_padded(prompts[s : s + args.batch], lens, dev)
        with torch.inference_mode():
            for _ in range(args.new):
                pos = (attn.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
                attn = torch.cat([attn, torch.ones_like(nxt)], dim=1)
                made += len(lens)
    return made


def main() -> None:
    args = parse_args()
    from transformers import AutoModelForCausalLM

    from kdcache.core.spec import GenerateSpec, parse_spec
    from kdcache.worker import toy
    from kdcache.worker.generate import generate_rows
    from kdcache.worker.runner import prepare_job, run_job
    from kdcache.worker.teachers import load_teacher

    torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-gen-"))
    toy.make_tiny_teacher(
        tmp / "teacher",
        vocab_size=args.vocab,
        hidden_size=args.dim,
        num_layers=args.layers,
        num_heads=4,
        max_positions=args.prompt_len + args.new,
        initializer_range=0.02,
    )
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.vocab, (args.rows, args.prompt_len)).astype(np.int64)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.rows)
    np.save(tmp / "prompts.npy", prompts.astype(np.int32))
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    teacher = load_teacher(parse_spec_teacher(tmp / "teacher", dtype, args.device))
    dev = teacher.device
    # no EOS stop, so every method makes rows x new tokens
    greedy = GenerateSpec(max_new_tokens=args.new, stop_at_eos=False)
    sampled = GenerateSpec(
        max_new_tokens=args.new, stop_at_eos=False, do_sample=True, temperature=0.8, top_p=0.95
    )
    total = args.rows * args.new
    rows = []
    for name, gen in (("kdcache greedy", greedy), ("kdcache sampled", sampled)):
        secs, _ = best(
            lambda g=gen: generate_rows(teacher, prompts, lengths, g, batch_size=args.batch),
            args.reps,
            dev,
        )
        rows.append((name, secs))
    model = AutoModelForCausalLM.from_pretrained(tmp / "teacher", dtype=teacher.dtype).to(dev)
    model.eval()

    def one_by_one() -> None:
        for r in range(args.rows):
            x = torch.from_numpy(prompts[r, : lengths[r]])[None].to(dev)
            with torch.inference_mode():
                model.generate(x, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                               pad_token_id=1)  # fmt: skip

    rows.append(("hf batch 1", best(one_by_one, args.reps, dev)[0]))
    sampled_hf = best(lambda: hf_sampled(model, prompts, lengths, args), args.reps, dev)[0]
    rows.append(("hf sampled", sampled_hf))
    rows.append(
        ("no kv cache", best(lambda: no_cache_greedy(model, prompts, lengths, args), 1, dev)[0])
    )
    base = rows[0][1]
    lo, hi = args.prompt_len // 2, args.prompt_len
    print(f"teacher d={args.dim} L={args.layers} V={args.vocab} on {dev}; {args.rows} prompts of "
          f"{lo}..{hi} tokens, {args.new} new each, batch {args.batch}")  # fmt: skip
    print(f"{'generation':<18}{'seconds':>9}{'new tok/s':>11}{'vs kdcache greedy':>19}")
    for name, secs in rows:
        print(f"{name:<18}{secs:>9.2f}{total / secs:>11.0f}{secs / base:>18.2f}x")

    spec = parse_spec(
        {
            "teacher": {"hf": str(tmp / "teacher"), "dtype": dtype, "device": args.device},
            "dataset": {"tokens": str(tmp / "prompts.npy")},
            "outputs": {"topk": 64, "temperatures": [1.0, 2.0], "hidden_layers": "uniform:2"},
            "batch_size": args.batch,
            "rows_per_shard": args.rows,
            "generate": {"max_new_tokens": args.new, "stop_at_eos": False},
        }
    )
    job = prepare_job(spec)
    root = tmp / "root"
    t0 = time.perf_counter()
    run_job(spec, root, job=job)
    whole = time.perf_counter() - t0
    cached = args.rows * (args.prompt_len + args.new)
    print(f"kdcache run (generate + teacher pass + write): {whole:.2f} s, {total / whole:.0f} new "
          f"tok/s, {cached / whole:.0f} cached positions/s; generating is "
          f"{100 * min(1.0, base / whole):.0f}% of it")  # fmt: skip


def parse_spec_teacher(path: Path, dtype: str, device: str) -> Any:
    from kdcache.core.spec import TeacherSpec

    return TeacherSpec(hf=str(path), dtype=dtype, device=device)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
