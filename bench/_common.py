"""What the teacher-pass benchmarks (teacher_pass.py, gpu_check.py) share: the job they time,
the bare forwards it is compared with, a device-aware timer, alternated runs, peak memory, and
the tables they print."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


def batches_of(ids: np.ndarray, batch: int, device: torch.device | None = None) -> list[Any]:
    """(N, T) token ids -> int64 tensors of ``batch`` rows (on ``device``)."""
    out = [torch.from_numpy(ids[i : i + batch]).long() for i in range(0, len(ids), batch)]
    return [x.to(device) for x in out] if device is not None else out


def forwards(model: Any, batches: list[Any]) -> tuple[Callable[[], None], Callable[[], None]]:
    """(body, full): bare forwards over ``batches`` of the model body (last hidden state only)
    and of the whole model (logits)."""

    def body() -> None:
        with torch.inference_mode():
            for x in batches:
                model.base_model(input_ids=x, use_cache=False)

    def full() -> None:
        with torch.inference_mode():
            for x in batches:
                model(input_ids=x, use_cache=False)

    return body, full


def extract_kwargs(manifest: Any) -> dict[str, Any]:
    """The extraction parameters of a cache manifest (kdcache.worker.extract.extract)."""
    m = manifest
    return {
        "topk": m.topk,
        "temperatures": m.temperatures,
        "layers": m.hidden_layers,
        "hidden_dtype": m.hidden_dtype,
        "index_dtype": m.index_dtype,
    }


def alternate(
    bare: Callable[[], object],
    job: Callable[[], object],
    reps: int,
    device: torch.device | None = None,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """``bare`` and ``job`` run alternately ``reps`` times: (wall bare, wall job, CPU bare,
    CPU job) seconds per run. CPU seconds are the process's (every thread, the writer's too)."""
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for i, fn in enumerate((bare, job)):
            c0 = time.process_time()
            wall[i].append(timed(fn, device))
            cpu[i].append(time.process_time() - c0)
    return wall[0], wall[1], cpu[0], cpu[1]


def print_speed(
    t_bare: list[float],
    t_job: list[float],
    tokens: int,
    names: tuple[str, str] = ("bare forward", "kdcache job"),
    cpu: tuple[list[float], list[float]] | None = None,
) -> float:
    """Print tokens/s of both sides and their ratio (medians of alternated runs); returns it."""
    mb, mj = statistics.median(t_bare), statistics.median(t_job)
    runs = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    print(f"  {names[0]:<18} {mb:8.3f} s  {tokens / mb:12,.0f} tokens/s  runs {runs(t_bare)}")
    print(f"  {names[1]:<18} {mj:8.3f} s  {tokens / mj:12,.0f} tokens/s  runs {runs(t_job)}")
    best = min(t_job) / min(t_bare)  # steadier than medians on a busy machine
    print(f"  {'ratio':<18} {mj / mb:8.3f}  (medians; aim <= 1.15)  best-of ratio {best:.3f}")
    if cpu is not None:
        cb, cj = statistics.median(cpu[0]), statistics.median(cpu[1])
        print(f"  {'CPU-time ratio':<18} {cj / cb:8.3f}  (process CPU seconds {cj:.2f} / {cb:.2f})")
    return mj / mb


def memory_table(
    runs: Sequence[tuple[str, Callable[[], object]]],
    tokens: int,
    logits_bytes: int,
    device: torch.device | None = None,
    body: str = "body forward",
    job: str = "kdcache job",
) -> float:
    """Print each run's peak memory above its start and tokens/s; returns the ``job`` run's peak
    above the ``body`` run's as a fraction of ``logits_bytes`` (one batch's float32 logits)."""
    peaks: dict[str, int] = {}
    for name, fn in runs:
        sec, peak = peak_memory(fn, device)
        peaks[name] = max(0, peak)  # a body forward may fit in memory freed earlier
        print(f"  {name:<20} peak +{peaks[name] / 2**30:7.3f} GiB  {tokens / sec:12,.0f} tokens/s")
    extra = peaks[job] - peaks[body]
    print(
        f"  {job} peak above the {body}: {extra / 2**30:.3f} GiB = {extra / logits_bytes:.1%} "
        "of one batch's float32 logits (aim <= 25%)"
    )
    return extra / logits_bytes
