#!/usr/bin/env python
"""Bytes per token and error of every top-k coding, sampled and hybrid targets, in one table.

On the demo's trained teacher at vocabulary 2048 (``bench/_demo_teacher.py`` trains it, or
``--teacher-dir`` reuses one), this writes real caches with ``run_job`` (the embedded runner,
the real writer and codecs), measures what ``kdcache inspect`` counts per array, and compares
what each cache says with the teacher's true distribution in float64:

- top-k rows: KL(p || q) over the cached top-k ids plus one tail class, p from the teacher's
  logits, q from the decoded cache (exact tail from the cached log-normaliser);
- sampled rows: the estimate of the mass outside the teacher's top-64 (draws outside it / N)
  minus the true mass (the top-64 alone says 0 there: its error is minus the tail);
- students (``--student-steps``, 0 to skip): the demo's 2-layer student, same init and batches,
  pure KD at t=1 from each kind of target; held-out KL(teacher || student) per position.

Usage::

    python bench/storage.py --teacher-dir bench-out/demo-teacher-2048 [--student-steps 300]

Prints one table; ``--json FILE`` writes the numbers too. Takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo_teacher import demo_module, ensure_teacher  # noqa: E402

REF_K = 64  # the tail-mass reference and the DistillKit comparison are at top-64
TEMPS = [1.0, 2.0]


def _settings(sample_ns: Sequence[int]) -> list[tuple[str, dict[str, Any]]]:
    """(cache label, outputs) of every cache the table needs; samples ride along top-k caches."""
    draws = list(sample_ns) + [0] * 8
    return [
        ("k64-fp16", {"topk": 64, "topk_codec": "fp16", "sample_draws": draws[0]}),
        ("k64-lossless", {"topk": 64, "topk_codec": "lossless", "sample_draws": draws[1]}),
        ("k64-lossless-xz", {"topk": 64, "topk_codec": "lossless-xz"}),
        ("k64-q8", {"topk": 64, "topk_codec": "q8", "sample_draws": draws[2]}),
        ("k64-q4", {"topk": 64, "topk_codec": "q4"}),
        ("k64-q8c", {"topk": 64, "topk_codec": "q8c"}),
        ("k64-q6c", {"topk": 64, "topk_codec": "q6c"}),
        ("k64-q4c", {"topk": 64, "topk_codec": "q4c"}),
        ("k64-q3c", {"topk": 64, "topk_codec": "q3c"}),
        ("k64-q8c-xz", {"topk": 64, "topk_codec": "q8c-xz"}),
        ("k64-q6c-xz", {"topk": 64, "topk_codec": "q6c-xz"}),
        ("k64-q4c-xz", {"topk": 64, "topk_codec": "q4c-xz"}),
        ("k64-q3c-xz", {"topk": 64, "topk_codec": "q3c-xz"}),
        ("k32-lossless", {"topk": 32, "topk_codec": "lossless"}),
        ("k32-q4", {"topk": 32, "topk_codec": "q4"}),
        ("k16-lossless", {"topk": 16, "topk_codec": "lossless"}),
        # the draws' log-probs summed per position (outputs.sample_logprobs: false; t=1 only)
        (
            "k16-lossless-s32sums",
            {"topk": 16, "topk_codec": "lossless", "sample_draws": 32, "sample_logprobs": False},
        ),  # fmt: skip
        # the same draws under an -xz code: ids in the dataset's id order, LZMA2
        ("k16-lossless-xz-s32", {"topk": 16, "topk_codec": "lossless-xz", "sample_draws": 32}),
        (
            "k16-lossless-xz-s32sums",
            {"topk": 16, "topk_codec": "lossless-xz", "sample_draws": 32, "sample_logprobs": False},
        ),  # fmt: skip
    ]


def write_caches(
    teacher: Path, tokens: Path, root: Path, sample_ns: Sequence[int], only: Sequence[str] = ()
) -> dict:
    """label -> (cache url, seconds); reuses complete caches under ``root``."""
    from kdcache.core.spec import parse_spec
    from kdcache.worker.runner import run_job

    out = {}
    for label, outputs in _settings(sample_ns):
        if only and label not in only:
            continue
        spec = {
            "name": f"storage-{label}",
            "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
            "dataset": {"tokens": str(tokens)},
            "outputs": {"temperatures": TEMPS, **outputs},
            "batch_size": 16,
            "rows_per_shard": 256,
        }
        t0 = time.perf_counter()
        url = run_job(parse_spec(spec), root)
        out[label] = (url, time.perf_counter() - t0)
        print(f"  cache {label:<14} {out[label][1]:6.1f} s  {url}", flush=True)
    return out


def array_bytes(url: str) -> dict[str, int]:
    from kdcache.core.inspect import inspect_cache

    return {a["name"]: int(a["bytes"]) for a in inspect_cache(url)["arrays"]}


@torch.inference_mode()
def teacher_logprobs(model: Any, ids: np.ndarray) -> torch.Tensor:
    """(B, T, V) float64 log-softmax of the teacher's float32 logits."""
    logits = model(input_ids=torch.from_numpy(ids).long()).logits
    return torch.log_softmax(logits.double(), -1)


def _log1mexp_sum(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(lp)) over the last axis, float64, floored at a tiny mass."""
    return torch.log((1 - lp.exp().sum(-1)).clamp_min(1e-300))


def topk_kl(true_lp: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position KL(p || q) over the cached ids + one tail class; (B, T) float64."""
    ids = batch["topk_indices"].long()
    p = true_lp.gather(-1, ids)
    q = batch["topk_logprobs"].double().clamp_min(-1e4)
    p_all = torch.cat([p, _log1mexp_sum(p)[..., None]], -1)
    q_all = torch.cat([q, _log1mexp_sum(q)[..., None]], -1)
    return (p_all.exp() * (p_all - q_all)).sum(-1)


def sampled_tail_error(true_lp: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position (estimated - true) mass outside the teacher's top-64; (B, T) float64."""
    top = true_lp.topk(REF_K, -1).indices
    ids, counts = batch["sample_indices"].long(), batch["sample_counts"].double()
    outside = ~(ids.unsqueeze(-1) == top.unsqueeze(-2)).any(-1)
    est = (counts * outside).sum(-1) / counts.sum(-1)
    true_tail = 1 - true_lp.gather(-1, top).exp().sum(-1)
    return est - true_tail


def measure_errors(model: Any, rows: np.ndarray, caches: dict, sample_ns: Sequence[int]) -> dict:
    """Mean errors over every position of ``rows`` for every cache: one teacher pass."""
    from kdcache.client.cache import TeacherCache

    opened = {label: TeacherCache(url) for label, (url, _) in caches.items()}
    sums: dict[str, list[torch.Tensor]] = {}
    sample_of = [lab for (lab, _), _n in _sample_labels(sample_ns) if lab in caches]
    for start in range(0, len(rows), 32):
        idx = np.arange(start, min(start + 32, len(rows)))
        true_lp = teacher_logprobs(model, rows[idx])
        top = true_lp.topk(REF_K, -1).values
        sums.setdefault("tail64", []).append((1 - top.exp().sum(-1)).flatten())
        for label, cache in opened.items():
            batch = cache.batch(idx, ["topk"])
            sums.setdefault(label, []).append(topk_kl(true_lp, batch).flatten())
        for label in sample_of:
            batch = opened[label].batch(idx, ["sample"])
            err = sampled_tail_error(true_lp, batch).flatten()
            sums.setdefault(f"sample:{label}", []).append(err)
            uniq = (batch["sample_counts"] > 0).sum(-1).double().flatten()
            sums.setdefault(f"unique:{label}", []).append(uniq)
    return {k: torch.cat(v) for k, v in sums.items()}


def _sample_labels(sample_ns: Sequence[int]) -> list[tuple[tuple[str, dict], int]]:
    return [(s, s[1]["sample_draws"]) for s in _settings(sample_ns) if s[1].get("sample_draws")]


# ---------------------------------------------------------------- students


def train_students(
    caches: dict, sample_ns: Sequence[int], val: np.ndarray, model: Any, args: argparse.Namespace
) -> list[tuple[str, float, float]]:
    """(label, bytes/token of the targets, held-out KL) per student; same init and batches."""
    from kdcache.client import losses
    from kdcache.client.cache import TeacherCache

    demo = demo_module()
    n = 32 if 32 in sample_ns else sample_ns[0]
    sample_label = next(lab for (lab, _), m in _sample_labels(sample_ns) if m == n)
    sample_bytes = _bytes_of(caches[sample_label][0], "sample/") / _tokens(caches[sample_label][0])
    matched = _byte_matched_topk(caches, sample_bytes)
    runs = [
        ("top-64 (exact tail bucket)", "k64-lossless", ["topk"], "topk"),
        (f"top-{matched[1]} at >= the draws' bytes", matched[0], ["topk"], "topk"),
        (f"{n} draws", sample_label, ["sample"], "sample"),
        (f"top-64 + {n} draws (hybrid)", sample_label, ["topk", "sample"], "topk+sample"),
    ]
    ref = torch.cat([teacher_logprobs(model, val[i : i + 16]) for i in range(0, len(val), 16)])
    out = []
    for label, cache_label, fields, targets in runs:
        url = caches[cache_label][0]
        cache = TeacherCache(url)
        used = sum(_bytes_of(url, f + "/") for f in fields) / _tokens(url)
        t0 = time.perf_counter()
        student = _train_one(demo, cache, fields, targets, args, losses)
        kl = heldout_kl(student, val, ref)
        print(f"  student {label:<34} {used:6.1f} B/token  KL {kl:.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        out.append((label, used, kl))
    return out


def _bytes_of(url: str, prefix: str) -> int:
    return sum(b for name, b in array_bytes(url).items() if name.startswith(prefix))


def _tokens(url: str) -> int:
    from kdcache.core.reader import CacheReader

    return CacheReader(url).manifest.num_tokens


def _byte_matched_topk(caches: dict, floor: float) -> tuple[str, int]:
    """The smallest lossless top-k cache whose top-k bytes/token are >= ``floor``."""
    for label, k in (("k16-lossless", 16), ("k32-lossless", 32), ("k64-lossless", 64)):
        url = caches[label][0]
        if _bytes_of(url, "topk/") / _tokens(url) >= floor:
            return label, k
    return "k64-lossless", 64


def _train_one(demo: Any, cache: Any, fields: list[str], targets: str, args: Any, losses: Any):
    m = cache.manifest
    torch.manual_seed(args.seed + 3)
    student = demo.llama(m.vocab_size, 96, 2, m.seq_len)
    data = cache.batch(np.arange(m.num_rows), ["input_ids", *fields])
    order = demo.batches(m.num_rows, 16, args.student_steps, args.seed + 2)

    def step_loss(step: int) -> torch.Tensor:
        batch = {k: v[torch.from_numpy(order[step])] for k, v in data.items()}
        logits = student(input_ids=batch["input_ids"]).logits
        return losses.kd_loss(logits, batch, temperature=1.0, targets=targets)

    demo.optimise(list(student.parameters()), args.student_steps, 3e-3, step_loss, targets)
    return student


@torch.inference_mode()
def heldout_kl(student: Any, val: np.ndarray, ref: torch.Tensor) -> float:
    """Mean over held-out positions of KL(teacher || student) at t=1, float64."""
    student.eval()
    total = 0.0
    for i in range(0, len(val), 16):
        logits = student(input_ids=torch.from_numpy(val[i : i + 16]).long()).logits
        q = torch.log_softmax(logits.double(), -1)
        p = ref[i : i + 16]
        total += float((p.exp() * (p - q)).sum(-1).sum())
    return total / (len(val) * val.shape[1])


# ---------------------------------------------------------------- table


def _row(label: str, parts: dict[str, float], err: str, note: str = "") -> str:
    total = sum(parts.values())
    split = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
    return f"| {label} | {total:.1f} | {split} | {err} | {note} |"


def table(caches: dict, errors: dict, sample_ns: Sequence[int]) -> list[str]:
    lines = [
        "| setting | B/token | per array (B/token) | error | note |",
        "| --- | ---: | --- | --- | --- |",
    ]
    short = {"topk/indices": "ids", "topk/logprobs": "logprobs", "topk/logsumexp": "lse"}
    for label, (url, _) in caches.items():
        sizes, n = array_bytes(url), _tokens(url)
        parts = {short[a]: sizes[a] / n for a in short}
        kl = errors[label]
        lines.append(_row(label, parts, f"KL {kl.mean():.2e}", f"max {kl.max():.1e}"))
    tail = errors["tail64"]
    for (label, outputs), n in _sample_labels(sample_ns):
        if label not in caches:
            continue
        url = caches[label][0]
        sizes, tok = array_bytes(url), _tokens(url)
        parts = {a.split("/")[1]: b / tok for a, b in sizes.items() if a.startswith("sample/")}
        e = errors[f"sample:{label}"]
        se = float(e.std()) / math.sqrt(e.numel())
        uniq = float(errors[f"unique:{label}"].mean())
        lines.append(
            _row(
                f"sampled N={n}"
                + ("" if outputs.get("sample_logprobs", True) else " (sums)")
                + (" xz" if str(outputs.get("topk_codec", "")).endswith("-xz") else ""),
                parts,
                f"tail {e.mean():+.4f} ± {se:.4f}",
                f"{uniq:.1f} unique ids/position",
            )  # fmt: skip
        )
    lines.append(f"| (top-64 alone: tail mass it drops) | | | tail {-tail.mean():+.4f} | |")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-dir", default="bench-out/demo-teacher-2048",
                   help="made here when it holds no finished teacher")  # fmt: skip
    p.add_argument("--teacher-steps", type=int, help="when training the teacher (default 600)")
    p.add_argument("--root", help="where the caches go (default: a temporary directory)")
    p.add_argument("--samples", default="16,32,64", help="draws per position to measure")
    p.add_argument("--settings", default="", help="only these caches (labels, comma-separated)")
    p.add_argument("--student-steps", type=int, default=300, help="0: no students")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM

    sample_ns = [int(x) for x in args.samples.split(",") if x.strip()]
    t0 = time.perf_counter()
    teacher, train, val = ensure_teacher(Path(args.teacher_dir), steps=args.teacher_steps)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="kdcache-storage-") as tmp:
        root = Path(args.root or tmp)
        tokens = root / "train.npy"
        root.mkdir(parents=True, exist_ok=True)
        np.save(tokens, train)
        print(f"teacher {teacher} (vocab {model.config.vocab_size}); "
              f"{train.shape[0]} x {train.shape[1]} tokens cached", flush=True)  # fmt: skip
        only = [x for x in args.settings.split(",") if x]
        caches = write_caches(teacher, tokens, root, sample_ns, only)
        errors = measure_errors(model, train, caches, sample_ns)
        lines = table(caches, errors, sample_ns)
        print("\n".join(lines), flush=True)
        students = []
        if args.student_steps:
            students = train_students(caches, sample_ns, val, model, args)
            print(f"\nstudents: {args.student_steps} steps x 16 rows, pure KD at t=1, same init; "
                  "held-out KL(teacher || student) per position")  # fmt: skip
            for label, used, kl in students:
                print(f"  {label:<36} targets {used:6.1f} B/token   held-out KL {kl:.4f}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"table": lines, "students": students, "seconds": time.perf_counter() - t0},
                indent=1))  # fmt: skip
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
