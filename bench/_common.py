"""What the teacher-pass benchmarks share: the job they time and a device-aware timer."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def teacher_pass_spec(
    args: argparse.Namespace, teacher: Path, tokens: Path, *, name: str, dtype: str, device: str
) -> Any:
    """The benchmarked job: top-k ``args.topk``, temperatures 1 and 2, two bf16 hidden layers."""
    from kdcache.core.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "teacher": {"hf": str(teacher), "dtype": dtype, "device": device},
            "dataset": {"tokens": str(tokens)},
            "outputs": {
                "topk": args.topk,
                "temperatures": [1.0, 2.0],
                "hidden_layers": "uniform:2",
                "hidden_dtype": "bfloat16",
            },
            "batch_size": args.batch,
            "rows_per_shard": args.rows_per_shard,
        }
    )


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds ``fn()`` takes, waiting for queued GPU work before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
