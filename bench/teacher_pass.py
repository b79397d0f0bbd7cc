#!/usr/bin/env python
"""Overhead of a kdcache teacher pass over the bare teacher forward, on CPU.

Prints ``ratio = (run_job wall time) / (bare model(ids) forwards over the same batches)`` for a
small random Llama. Both sides reuse one loaded model: the job is prepared once
(:func:`prepare_job`) and handed to :func:`run_job`, so model loading is not timed. The two are
alternated ``--reps`` times and the medians compared (the ratio of the fastest runs is
printed too: on a shared machine it is the steadier number). The aim is a ratio <= 1.15.

A second configuration, a vocab-131,072 teacher (d=64, 2 layers, T=256, batch 8; ``--mem-*``),
shows memory: the peak resident memory above the start of a bare forward of the model body (last
hidden state only), of a full forward (logits), and of the kdcache pass, against one batch's
float32 logits. The fused LM head's aim: the pass's peak above the body's is <= 25% of those.

``--breakdown`` also times the parts of the job on their own (teacher forward with hooks, top-k /
log-sum-exp extraction, shard writes); ``--profile`` prints cProfile's top functions of one
``run_job`` (main thread only: the shard writer runs on a thread of its own).

Usage: ``python bench/teacher_pass.py [--rows 96] [--reps 3] [--breakdown] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from _common import (
    alternate,
    batches_of,
    extract_kwargs,
    forwards,
    memory_table,
    print_speed,
    teacher_pass_spec,
    timed,
)

if TYPE_CHECKING:
    from kdcache.core.spec import JobSpec
    from kdcache.worker.runner import PreparedJob

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--rows-per-shard", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mem-vocab", type=int, default=131_072, help="0 skips the memory config")
    p.add_argument("--mem-dim", type=int, default=64)
    p.add_argument("--mem-rows", type=int, default=16)
    p.add_argument("--breakdown", action="store_true", help="time the job's parts on their own")
    p.add_argument("--profile", action="store_true", help="cProfile one run_job")
    return p.parse_args()


def memory_args(args: argparse.Namespace) -> argparse.Namespace:
    """The memory configuration: the large-vocab teacher of issue 10's measurements."""
    return argparse.Namespace(
        **{
            **vars(args),
            "vocab": args.mem_vocab,
            "dim": args.mem_dim,
            "layers": 2,
            "rows": args.mem_rows,
            "rows_per_shard": args.mem_rows,
        }
    )


def memory_config(args: argparse.Namespace, work: Path) -> None:
    """Peak memory of a body forward, a full forward and the kdcache pass, side by side."""
    from kdcache.worker.runner import run_job

    margs = memory_args(args)
    work.mkdir(parents=True, exist_ok=True)
    spec, job = make_job(margs, work)
    body, full = forwards(job.teacher.model, batches_of(np.load(work / "tokens.npy"), args.batch))
    roots = iter(range(10**6))

    def job_pass() -> None:
        run_job(spec, work / f"mroot{next(roots)}", job=job)

    def unfused() -> None:  # the path of teachers without a linear head (and of kdcache <= 0.1)
        head, job.teacher.head = job.teacher.head, None  # type: ignore[attr-defined]
        try:
            job_pass()
        finally:
            job.teacher.head = head  # type: ignore[attr-defined]

    for fn in (body, full, job_pass):
        fn()  # warm-up: allocator pools and lazy imports are not the pass's memory
    logits = args.batch * args.seq_len * margs.vocab * 4
    fused = getattr(job.teacher, "head", None) is not None
    print(
        f"\nmemory: Llama d={margs.dim}, 2 layers, vocab {margs.vocab}; {margs.rows} rows x "
        f"{args.seq_len}, batch {args.batch}; one batch's float32 logits "
        f"{logits / 2**30:.2f} GiB; fused head: {fused}"
    )
    runs = [("body forward", body), ("full forward", full), ("kdcache job", job_pass)]
    if fused:
        runs.append(("kdcache job unfused", unfused))
    memory_table(runs, margs.rows * args.seq_len, logits)


def make_job(args: argparse.Namespace, work: Path) -> tuple[JobSpec, PreparedJob]:
    """A random teacher + tokens under ``work``; returns (spec, prepared job)."""
    from kdcache.worker.runner import prepare_job
    from kdcache.worker.toy import make_tiny_teacher, make_tokens

    teacher = make_tiny_teacher(
        work / "teacher",
        vocab_size=args.vocab,
        hidden_size=args.dim,
        num_layers=args.layers,
        num_heads=max(1, args.dim // 64),
        max_positions=args.seq_len,
    )
    tokens = make_tokens(work / "tokens.npy", args.rows, args.seq_len, args.vocab)
    spec = teacher_pass_spec(
        args, teacher, tokens, name="bench-teacher-pass", dtype="float32", device="cpu"
    )
    return spec, prepare_job(spec)


def main() -> int:
    args = parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from kdcache.worker.extract import extract_batches
    from kdcache.worker.runner import run_job

    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        work = Path(tmp)
        spec, job = make_job(args, work)
        ids = np.load(work / "tokens.npy")
        batches = batches_of(ids, args.batch)
        _, bare = forwards(job.teacher.model, batches)
        roots = iter(range(10**6))

        def job_pass() -> None:  # a fresh root each time: a finished cache would be skipped
            run_job(spec, work / f"root{next(roots)}", job=job)

        print(
            f"teacher: Llama d={args.dim}, {args.layers} layers, vocab {args.vocab}; "
            f"{args.rows} rows x {args.seq_len} tokens, batch {args.batch}; "
            f"top-k {args.topk}, temperatures [1, 2], 2 hidden layers bf16; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        bare()  # warm-up
        job_pass()
        t_bare, t_job, c_bare, c_job = alternate(bare, job_pass, args.reps)
        print(f"speed (medians of {args.reps} alternated runs; model load not timed)")
        tokens = args.rows * args.seq_len
        print_speed(t_bare, t_job, tokens, ("bare forward", "kdcache job"), (c_bare, c_job))

        if args.mem_vocab:
            memory_config(args, work / "memory")

        if args.breakdown:
            m = job.manifest
            hooks = timed(lambda: [job.teacher.forward(x, m.hidden_layers) for x in batches])
            data: dict[str, np.ndarray] = {}

            def extract() -> None:
                kw = extract_kwargs(m)
                data.update(extract_batches(job.teacher, ids, batch_size=args.batch, **kw))

            t_extract = timed(extract)
            print("breakdown (each part alone, one pass)")
            print(f"  forward + hidden hooks     {hooks:7.3f} s")
            print(f"  extract (fwd + top-k/lse)  {t_extract:7.3f} s")
            print(f"  shard writes (by thread)   {time_writes(job, data, work):7.3f} s")

        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(job_pass)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
            print(buf.getvalue())
    return 0


def time_writes(job: PreparedJob, data: dict[str, np.ndarray], work: Path) -> float:
    """Seconds to write every shard of ``data`` (already computed) to a fresh cache."""
    from kdcache.worker.runner import open_writer

    writer = open_writer(job, str(work / "writes"))
    m = writer.manifest
    t0 = time.perf_counter()
    for shard in range(m.num_shards):
        start, end = m.shard_rows(shard)
        part = {k: v[start:end] for k, v in data.items()}
        part["input_ids"] = np.zeros((end - start, m.seq_len), dtype=np.int32)
        part["loss_mask"] = np.ones((end - start, m.seq_len), dtype=bool)
        writer.commit(writer.write_shard(shard, part, writer={"bench": True}))
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
