#!/usr/bin/env python
"""Check and time kdcache's CUDA path in one short run (< 5 minutes on an H100, no network).

A mid-size random Llama (default d=1024, 8 layers, vocab 32000, T=512), saved in bfloat16, is
cached with ``run_job`` on CUDA in bfloat16 (top-k 64, temperatures [1, 2], 2 hidden layers).
Then:

- accuracy: an fp32 forward of the same (bf16-representable) weights is the reference. For the
  cached top-k: top-1 and top-k index agreement, max |log-prob diff| on the ids in both top-k
  sets, and |lse diff| per temperature; the same numbers for a bare bf16 forward, so what kdcache
  adds (fp16 storage of log-probs) shows apart from what bf16 costs anyway; and the cosine of each
  cached hidden layer to the fp32 one.
- speed: the teacher-pass ratio (run_job wall time / bare bf16 forwards over the same batches),
  alternated ``--reps`` times, medians, as in ``bench/teacher_pass.py``.
- memory: peak GPU memory above the start of a bare forward of the body, of a full forward, and
  of the kdcache pass (fused LM head), against one batch's float32 logits.
- fused vs unfused: the same rows extracted both ways agree within bf16 rounding.
- loader: the cache read back through ``ds.loader(pin_memory=True)`` with 0 and 2 DataLoader
  workers, batches moved to the device: every batch pinned (workers' batches are pinned by the
  loader's own thread), values equal to a plain read, and seconds per epoch of each.
- with more than one GPU: the teacher split over GPUs 0 and 1 (accelerate device map, forced by a
  small memory budget on GPU 0) gives the single-GPU numbers.

Each check after the cache pass runs even when an earlier one fails (its traceback is printed);
the script then exits 1 and names the failed checks on its last line. Without a CUDA device it
prints "no CUDA device, skipped" and exits 0. ``--device cpu`` with small
sizes exercises the same code on a CPU (for developing this script, not for its numbers).

Usage: ``python bench/gpu_check.py [--rows 256] [--check-rows 8] [--reps 3]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to develop")
    p.add_argument("--rows", type=int, default=256, help="dataset rows cached per pass")
    p.add_argument("--check-rows", type=int, default=8, help="rows compared with fp32")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--rows-per-shard", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--init-range",
        type=float,
        default=0.05,
        help="weight init std: larger gives peakier (more realistic) next-token distributions",
    )
    return p.parse_args()


def make_teacher(args: argparse.Namespace, path: Path, device: torch.device) -> Path:
    """A random Llama made on ``device``, saved in bfloat16: the weights both runs use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=int(2.75 * args.dim),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.dim // 64),
        num_key_value_heads=max(1, args.dim // 128),
        max_position_embeddings=args.seq_len,
        initializer_range=args.init_range,
    )
    torch.manual_seed(0)
    with device:
        model: Any = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)
    del model
    return path


def topk_stats(
    logprobs: torch.Tensor, indices: torch.Tensor, ref: torch.Tensor
) -> tuple[float, float, float, float]:
    """Agreement of a top-k (B, T, k) with the fp32 reference log-probs (B, T, V).

    Returns (top-1 agreement, mean top-k set overlap, max and mean |log-prob diff| on the ids in
    both top-k sets).
    """
    k = indices.shape[-1]
    ref_idx = ref.topk(k, dim=-1).indices
    top1 = float((indices[..., 0] == ref_idx[..., 0]).float().mean())
    # in_both[b, t, i]: the i-th cached id is also in the reference top-k
    in_both = (indices.unsqueeze(-1) == ref_idx.unsqueeze(-2)).any(-1)
    overlap = float(in_both.float().sum(-1).mean() / k)
    diff = (logprobs.float() - ref.gather(-1, indices)).abs()[in_both]
    return top1, overlap, float(diff.max()), float(diff.mean())


def logprobs_of(logits: torch.Tensor, temps: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V) -> (log-probs at t=1 (B, T, V) float32, lse (B, T, n_temps) float32)."""
    z = logits.float()
    lse = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temps], dim=-1)
    return z - lse[..., temps.index(1.0), None], lse


def accuracy(
    args: argparse.Namespace, teacher_dir: Path, cache_path: str, bf16_model: Any, dev: torch.device
) -> None:
    """Compare the cache and a bare bf16 forward with an fp32 forward on ``--check-rows`` rows."""
    from transformers import AutoModelForCausalLM

    from kdcache.client.cache import TeacherCache

    cache = TeacherCache(cache_path)
    m = cache.manifest
    batch = cache.batch(np.arange(min(args.check_rows, m.num_rows)))
    ids = batch["input_ids"].to(dev)
    ref_model: Any = AutoModelForCausalLM.from_pretrained(
        teacher_dir, dtype=torch.float32, local_files_only=True
    )
    ref_model.to(dev)
    temps = list(m.temperatures)
    with torch.inference_mode():
        ref_out = ref_model(input_ids=ids, use_cache=False, output_hidden_states=True)
        ref, ref_lse = logprobs_of(ref_out.logits, temps)
        bare, bare_lse = logprobs_of(bf16_model(input_ids=ids, use_cache=False).logits, temps)
    bare_lp, bare_idx = bare.topk(m.topk, dim=-1)
    cached = (
        batch["topk_logprobs"].to(dev),
        batch["topk_indices"].to(dev),
        batch["topk_logsumexp"].to(dev),
    )
    t_names = "/".join(f"{t:g}" for t in temps)
    print(f"accuracy vs an fp32 forward of the same weights ({ids.shape[0]} rows x {m.seq_len})")
    print(f"  {'':<18} {'top-1':>7} {'top-k':>7} {'max|dlogp|':>11} {'mean|dlogp|':>12}  max|dlse|")
    for name, (lp, idx, lse) in (
        ("kdcache cache", cached),
        ("bare bf16 forward", (bare_lp, bare_idx, bare_lse)),
    ):
        top1, overlap, dmax, dmean = topk_stats(lp, idx, ref)
        dlse = "/".join(
            f"{float((lse[..., i] - ref_lse[..., i]).abs().max()):.4f}" for i in range(len(temps))
        )
        print(
            f"  {name:<18} {top1:7.2%} {overlap:7.2%} {dmax:11.4f} {dmean:12.5f}  "
            f"{dlse} (t={t_names})"
        )
    top1, overlap, dmax, dmean = topk_stats(cached[0], cached[1], bare)
    print(
        f"  cache vs bare bf16 (what kdcache adds): top-1 {top1:.2%}, top-k {overlap:.2%}, "
        f"max|dlogp| {dmax:.4f}, mean {dmean:.5f}"
    )
    for layer in m.hidden_layers:
        got = batch[f"hidden_{layer}"].to(dev).float()
        cos = F.cosine_similarity(got, ref_out.hidden_states[layer].float(), dim=-1)
        print(
            f"  hidden {layer}: cosine to fp32 min {float(cos.min()):.5f}, "
            f"mean {float(cos.mean()):.5f}"
        )


def memory(
    args: argparse.Namespace,
    job: Any,
    batches: list[torch.Tensor],
    job_pass: Any,
    dev: torch.device,
) -> None:
    """Peak memory above the start: body forward, full forward, kdcache pass (fused head)."""
    body, full = forwards(job.teacher.model, batches)
    logits = args.batch * args.seq_len * args.vocab * 4
    fused = getattr(job.teacher, "head", None) is not None
    print(f"memory (one batch's float32 logits {logits / 2**30:.3f} GiB; fused head: {fused})")
    runs = [("body forward", body), ("full forward", full), ("kdcache run_job", job_pass)]
    memory_table(runs, args.rows * args.seq_len, logits, dev, job="kdcache run_job")


def fused_vs_unfused(job: Any, ids: np.ndarray, dev: torch.device) -> None:
    """The same rows through the fused head and through the model's own logits."""
    from kdcache.worker.extract import extract

    kw = extract_kwargs(job.manifest)
    a = extract(job.teacher, ids, fused=True, **kw)
    b = extract(job.teacher, ids, fused=False, **kw)
    dlse = float(np.abs(a["topk/logsumexp"] - b["topk/logsumexp"]).max())
    same = float((a["topk/indices"] == b["topk/indices"]).mean())
    dlp = float(np.abs(a["topk/logprobs"].astype(np.float32) - b["topk/logprobs"]).max())
    ok = dlse < 0.05 and same > 0.95
    print(
        f"fused vs unfused head ({ids.shape[0]} rows): max|dlse| {dlse:.4f}, top-k ids equal "
        f"{same:.2%}, max|dlogp| {dlp:.4f}  {'OK' if ok else 'MISMATCH'}"
    )


def split_check(teacher_dir: Path, job: Any, ids: np.ndarray) -> None:
    """The teacher over GPUs 0 and 1 (a budget on GPU 0 forces the split) vs one GPU."""
    from transformers import AutoModelForCausalLM

    from kdcache.worker.extract import extract
    from kdcache.worker.placement import plan_device_map
    from kdcache.worker.teachers import HFTeacher

    size = sum(p.numel() * p.element_size() for p in job.teacher.model.parameters())
    dmap = plan_device_map(teacher_dir, torch.bfloat16, {0: size // 2, 1: 2 * size})
    model = AutoModelForCausalLM.from_pretrained(
        teacher_dir, dtype=torch.bfloat16, local_files_only=True, device_map=dmap
    )
    split = HFTeacher(model, description="split over cuda:0,cuda:1")
    kw = extract_kwargs(job.manifest)
    a, b = extract(job.teacher, ids, **kw), extract(split, ids, **kw)
    dlse = float(np.abs(a["topk/logsumexp"] - b["topk/logsumexp"]).max())
    same = float((a["topk/indices"] == b["topk/indices"]).mean())
    gpus = sorted(set(dmap.values()), key=str)
    ok = dlse < 0.05 and same > 0.95 and len(gpus) == 2
    print(
        f"split teacher over GPUs {gpus} (fused head: {split.head is not None}): "
        f"max|dlse| {dlse:.4f} vs one GPU, top-k ids equal {same:.2%}  {'OK' if ok else 'MISMATCH'}"
    )
    del model, split
    torch.cuda.empty_cache()


def loader_check(cache_path: str, batch: int, dev: torch.device) -> None:
    """Read the cache back pinned, with and without workers; check values, pinning and time."""
    from kdcache.client.dataset import CacheDataset

    kw: dict[str, Any] = {"fields": ["input_ids", "topk", "hidden"], "seed": 0}
    want = [
        {k: v.clone() for k, v in b.items()}
        for b in CacheDataset(cache_path, **kw).loader(batch_size=batch)
    ]
    for workers in (0, 2):
        extra: dict[str, Any] = {"multiprocessing_context": "fork"} if workers else {}
        loader = CacheDataset(cache_path, **kw).loader(
            batch_size=batch, num_workers=workers, pin_memory=True, **extra
        )
        pinned = equal = True
        n = 0
        t0 = time.perf_counter()
        for n, b in enumerate(loader, 1):
            pinned = pinned and all(v.is_pinned() for v in b.values())
            on_dev = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            equal = equal and all(torch.equal(on_dev[k].cpu(), want[n - 1][k]) for k in b)
        secs = time.perf_counter() - t0
        print(
            f"loader pin_memory=True, {workers} workers: {n} batches, all pinned {pinned}, "
            f"equal to a plain read {equal and n == len(want)}, {secs:.2f} s (with checks)"
        )


def main() -> int:
    args = parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device, skipped")
        return 0
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from kdcache.worker.extract import extract_batches
    from kdcache.worker.runner import prepare_job, run_job
    from kdcache.worker.toy import make_tokens

    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory(prefix="kdcache-gpu-") as tmp:
        work = Path(tmp)
        teacher_dir = make_teacher(args, work / "teacher", dev)
        tokens = make_tokens(work / "tokens.npy", args.rows, args.seq_len, args.vocab)
        spec = teacher_pass_spec(
            args, teacher_dir, tokens, name="gpu-check", dtype="bfloat16", device=args.device
        )
        job = prepare_job(spec)
        model = job.teacher.model
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"teacher: random Llama d={args.dim}, {args.layers} layers, vocab {args.vocab}, "
            f"{n_params / 1e6:.0f}M params, bf16; {args.rows} rows x {args.seq_len}, "
            f"batch {args.batch}; top-k {args.topk}, 2 hidden layers bf16"
        )
        ids = np.load(tokens)
        batches = batches_of(ids, args.batch, dev)
        _, bare = forwards(model, batches)
        roots = iter(range(10**6))

        def job_pass() -> str:  # a fresh root each time: a finished cache would be skipped
            return run_job(spec, work / f"root{next(roots)}", job=job)

        bare()
        cache_path = job_pass()  # warm-up; this cache is the one checked below
        t_bare, t_job, _, _ = alternate(bare, job_pass, args.reps, dev)
        print("speed (medians of alternated runs; model load not timed)")
        tokens = args.rows * args.seq_len
        print_speed(t_bare, t_job, tokens, ("bare bf16 forward", "kdcache run_job"))
        kw = extract_kwargs(job.manifest)
        t_extract = timed(
            lambda: extract_batches(job.teacher, ids, batch_size=args.batch, **kw), dev
        )
        print(f"  extraction alone   {t_extract:8.3f} s  (forward + top-k/lse + copies, no writes)")
        checks: list[tuple[str, Callable[[], None]]] = [
            ("memory", lambda: memory(args, job, batches, job_pass, dev)),
            ("fused vs unfused", lambda: fused_vs_unfused(job, ids[: args.batch], dev)),
            ("accuracy", lambda: accuracy(args, teacher_dir, cache_path, model, dev)),
            ("loader", lambda: loader_check(cache_path, args.batch, dev)),
        ]
        if dev.type == "cuda" and torch.cuda.device_count() > 1:
            checks.append(
                ("split teacher", lambda: split_check(teacher_dir, job, ids[: args.batch]))
            )
        # one device session is all there may be: a failing check is reported and the rest run
        failed = [name for name, check in checks if not _section(name, check)]
    print(f"total {time.perf_counter() - t_start:.0f}s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


def _section(name: str, check: Callable[[], None]) -> bool:
    """Run one check; on an exception print it (with where it came from) and return False."""
    t0 = time.perf_counter()
    try:
        check()
    except Exception:
        print(f"{name} check FAILED after {time.perf_counter() - t0:.0f}s:")
        traceback.print_exc(limit=-6, file=sys.stdout)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
