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


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, int]:
    """(seconds, peak bytes above the start) of ``fn()``: GPU memory allocated by torch on CUDA,
    else the process's resident set (the kernel's high-water mark, reset before ``fn``)."""
    if device is not None and device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = timed(fn, device)
        return seconds, torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
        f.write("5")
    base = _rss_kib("VmRSS")
    seconds = timed(fn)
    return seconds, (_rss_kib("VmHWM") - base) * 1024
