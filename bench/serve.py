"""Benchmark: read a whole cache over HTTP from a real ``kdcache serve`` vs. from its directory.

Builds a cache of a tiny random teacher (``kdcache.worker.toy``) through the service (submit, then
an in-process worker), then reads every row with ``--readers`` concurrent threads, each with its
own reader, ``--batch`` rows per read, all fields, three ways, side by side in one run:

- ``local``: ``TeacherCache`` over the cache directory;
- ``http-old``: the former HTTP reader (zarr's FsspecStore over fsspec/aiohttp: one Range request
  per shard index and per inner chunk, each key checked with a HEAD);
- ``http``: ``TeacherCache("http://.../v1/caches/<id>")`` (kept-alive httpx pool; per batch one
  ``POST .../ranges`` for the shard indexes it has not seen and one for every chunk it needs).

Prints MB/s (decoded, stored dtypes), tokens/s, HTTP requests per batch (the service's
``/metrics`` counts), CPU seconds of this process and the service together (less sensitive to
a loaded machine than wall time), and the ratios HTTP / local, of the best and of the median
of ``--rounds`` rounds (the sources take turns within each round), with the load average.

    python bench/serve.py                       # ~1 min on 2 shared cores
    python bench/serve.py --rows 2048 --readers 8 --batch 32
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_service(root: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kdcache.cli", "serve", "--root", str(root)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDCACHE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), "--quiet"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kdcache serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"kdcache serve did not answer within 60 s:\n{log.read_text()}")


def _build_cache(url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kdcache.worker import toy
    from kdcache.worker.lease import run_worker

    teacher = toy.make_tiny_teacher(
        work / "teacher",
        hidden_size=args.hidden_size,
        num_layers=2,
        max_positions=max(128, args.seq_len),
    )
    tokens = toy.make_tokens(work / "tokens.npy", args.rows, args.seq_len, 320, seed=0)
    spec = {
        "name": "bench-serve",
        "teacher": {"hf": str(teacher), "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": args.topk, "temperatures": [1.0, 2.0], "hidden_layers": [1, 2]},
        "batch_size": 16,
        "rows_per_shard": args.rows_per_shard,
    }
    resp = httpx.post(f"{url}/v1/jobs", json=spec, timeout=60)
    resp.raise_for_status()
    job_id = resp.json()["id"]
    t0 = time.perf_counter()
    run_worker(url, device="cpu", poll_interval=0.2, max_idle=1.0, job_id=job_id)
    job = dict(httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())
    if job["status"] != "done":
        raise SystemExit(f"the bench job did not finish: {job}")
    secs = time.perf_counter() - t0
    print(f"built cache {job['cache_id']}: {job['rows_total']} rows in {secs:.1f}s")
    return job


class _FsspecCache:
    """The former HTTP reader: zarr's FsspecStore over fsspec's HTTP file system (aiohttp),
    each shard index and inner chunk its own Range request, completion from the service."""

    def __init__(self, base: str, cache_id: str) -> None:
        from kdcache.client._fields import expand_fields, stored_arrays, to_tensors
        from kdcache.client._remote import RemoteStorage
        from kdcache.client.cache import _attach_optional
        from kdcache.core.reader import CacheReader
        from kdcache.core.shards import ShardRecord
        from kdcache.core.storage import FsspecStorage

        detail = httpx.get(f"{base}/v1/caches/{cache_id}", timeout=30).json()
        records = {int(r["shard"]): ShardRecord.from_dict(r) for r in detail["completed"]}
        storage = FsspecStorage(f"{base}/v1/caches/{cache_id}/store")
        self.reader = _attach_optional(
            CacheReader(storage.url, storage=RemoteStorage(storage), completed=lambda: records)
        )
        self._fields = (expand_fields, stored_arrays, to_tensors)

    def batch(self, rows: Any) -> dict[str, torch.Tensor]:
        expand_fields, stored_arrays, to_tensors = self._fields
        m = self.reader.manifest
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        keys = expand_fields(m, None)
        names = stored_arrays(keys, self.reader.arrays)
        raw = {f: self.reader.read(name, idx) for f, name in names.items()}
        return dict(to_tensors(m, idx, raw, keys))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _served_requests(url: str) -> int:
    """Requests the service answered on the store and ranges routes (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("kdcache_request_seconds_count") and "/v1/caches/{cache_id}/" in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _read_all(open_cache: Callable[[], Any], rows: int, readers: int, batch: int) -> float:
    """Seconds for ``readers`` threads to read every row once, ``batch`` rows per read."""
    batches = [np.arange(s, min(rows, s + batch)) for s in range(0, rows, batch)]
    errors: list[BaseException] = []

    def read(part: list[np.ndarray]) -> None:
        try:
            cache = open_cache()
            for idx in part:
                cache.batch(idx)
        except BaseException as err:  # reported after the join
            errors.append(err)

    threads = [threading.Thread(target=read, args=(batches[i::readers],)) for i in range(readers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="dataset rows (default 512)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--topk", type=int, default=32, help="top-k kept (default 32)")
    p.add_argument("--hidden-size", type=int, default=64, help="teacher width (default 64)")
    p.add_argument("--rows-per-shard", type=int, default=64, help="rows per shard (default 64)")
    p.add_argument("--readers", type=int, default=4, help="concurrent reader threads (default 4)")
    p.add_argument("--batch", type=int, default=16, help="rows per read (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)

    from kdcache.client import TeacherCache

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-serve-"))
    proc, url = _start_service(work / "root", work / "service.log")
    try:
        job = _build_cache(url, work, args)
        remote_url = f"{url}/v1/caches/{job['cache_id']}"
        local_dir = work / "root" / "caches" / job["cache_id"]
        ref = TeacherCache(local_dir)
        check = [0, args.rows // 2, args.rows - 1]
        got, want = TeacherCache(remote_url).batch(check), ref.batch(check)
        if not all(torch.equal(got[k], want[k]) for k in want):
            raise SystemExit("HTTP and local reads differ")
        m = ref.manifest
        nbytes = sum(
            m.num_rows * math.prod(a.row_shape) * np.dtype(a.dtype).itemsize for a in m.arrays()
        )
        tokens = m.num_rows * m.seq_len
        old = _FsspecCache(url, job["cache_id"])
        if not all(torch.equal(old.batch(check)[k], want[k]) for k in want):
            raise SystemExit("the former HTTP reader and local reads differ")
        sources = {
            "local": lambda: TeacherCache(local_dir),
            "http-old": lambda: _FsspecCache(url, job["cache_id"]),
            "http": lambda: TeacherCache(remote_url),
        }
        best = dict.fromkeys(sources, math.inf)
        walls: dict[str, list[float]] = {name: [] for name in sources}
        requests = dict.fromkeys(sources, 0)
        cpu = dict.fromkeys(sources, math.inf)
        load0 = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, open_cache in sources.items():
                before = _served_requests(url)
                cpu0 = time.process_time() + _cpu_seconds(proc.pid)
                secs = _read_all(open_cache, m.num_rows, args.readers, args.batch)
                cpu[name] = min(cpu[name], time.process_time() + _cpu_seconds(proc.pid) - cpu0)
                requests[name] = _served_requests(url) - before
                best[name] = min(best[name], secs)
                walls[name].append(secs)
        median = {name: statistics.median(w) for name, w in walls.items()}
        batches = math.ceil(m.num_rows / args.batch)
        print(
            f"cache: {m.num_rows} rows x {m.seq_len} tokens, top-{m.topk}, layers "
            f"{m.hidden_layers} (d={m.hidden_size}), {nbytes / 1e6:.1f} MB decoded; "
            f"{args.readers} readers x {args.batch} rows/read, best of {args.rounds}; "
            f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        for name, secs in best.items():
            print(
                f"{name:>8}: {secs:6.2f} s  {nbytes / 1e6 / secs:8.1f} MB/s  "
                f"{tokens / secs:12,.0f} tokens/s  {requests[name] / batches:6.1f} requests/batch"
                f"  {cpu[name]:6.2f} CPU-s (reader + service)  median {median[name]:6.2f} s"
            )
        for num, den in (("http-old", "local"), ("http", "local"), ("http", "http-old")):
            print(
                f" ratio: {num}/{den} = {best[den] / best[num]:.2f} (throughput, best), "
                f"{median[den] / median[num]:.2f} (median)"
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
