"""How fast CacheDataset delivers a cache, next to how fast its bytes can be read and decoded.

    python bench/stream.py                       # local, HTTP (service) and S3 (moto)
    python bench/stream.py --sources local --rows 2048 --workdir /data/bench

Builds (once, under --workdir) a cache from a random-init teacher, then measures, on the same
stored bytes of the fields read:

- raw read: every shard file read like ``cat`` (8 MiB reads; hot page cache after the first pass);
- decode only: every stored chunk decompressed from memory (Blosc, ``--threads`` threads), no I/O;
- CacheDataset: one shuffled epoch, rows handed to the caller, for each source.

MB/s are stored (compressed) bytes per second, so the three compare directly; "tensor MB/s" is
what the caller receives. HTTP runs the kdcache service under uvicorn and S3 runs moto, both in
this process, so they compete with the client for the interpreter: read those as lower bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np

from kdcache.client.dataset import CacheDataset


def build_cache(args: argparse.Namespace) -> tuple[str, dict[str, Any], Path]:
    """The bench cache (built on first use): (url, job spec, storage root)."""
    from kdcache.core.spec import parse_spec
    from kdcache.worker import toy
    from kdcache.worker.runner import run_job

    tag = f"r{args.rows}-t{args.seq_len}-k{args.topk}-d{args.hidden_size}-v{args.vocab}"
    base = Path(args.workdir) / tag
    teacher = base / "teacher"
    if not (teacher / "config.json").exists():
        toy.make_tiny_teacher(
            teacher,
            vocab_size=args.vocab,
            hidden_size=args.hidden_size,
            num_layers=2,
            max_positions=args.seq_len,
        )
    tokens = base / "tokens.npy"
    if not tokens.exists():
        toy.make_tokens(tokens, args.rows, args.seq_len, args.vocab, seed=0)
    spec = {
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": args.topk, "temperatures": [1.0, 2.0], "hidden_layers": [2]},
        "rows_per_shard": args.rows_per_shard,
        "batch_size": 32,
    }
    url = run_job(parse_spec(spec), base / "root")
    return url, spec, base / "root"


def shard_files(url: str, arrays: list[str]) -> list[Path]:
    return sorted(p for a in arrays for p in (Path(url) / a / "c").rglob("*") if p.is_file())


def best(fn: Callable[[], float], repeat: int) -> float:
    """The shortest of ``repeat`` timings of ``fn`` (which returns seconds)."""
    return min(fn() for _ in range(repeat))


def raw_read(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass
    return time.perf_counter() - t0


def chunks_in_memory(url: str, arrays: list[str]) -> list[bytes]:
    """Every stored inner chunk of ``arrays``, sliced out of its shard by the shard index."""
    out = []
    for name in arrays:
        meta = json.loads((Path(url) / name / "zarr.json").read_text())
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = meta["codecs"][0]["configuration"]["chunk_shape"]
        n = int(np.prod([s // i for s, i in zip(shard, inner, strict=True)]))
        for path in shard_files(url, [name]):
            blob = path.read_bytes()
            index = np.frombuffer(blob[-(16 * n + 4) : -4], dtype="<u8").reshape(n, 2)
            out += [blob[o : o + k] for o, k in index.tolist() if o != 2**64 - 1]
    return out


def decode_only(chunks: list[bytes], threads: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(numcodecs.blosc.decompress, chunks, chunksize=4):
            pass
    return time.perf_counter() - t0


def epoch(make: Callable[[], CacheDataset], workers: int, batch: int) -> tuple[float, int, int]:
    """(seconds, rows, tensor bytes) of one shuffled epoch handed to the caller."""
    ds = make()
    t0 = time.perf_counter()
    rows = nbytes = 0
    if workers:
        for b in ds.loader(batch_size=batch, num_workers=workers, multiprocessing_context="fork"):
            rows += len(b["row"])
            nbytes += sum(v.numel() * v.element_size() for v in b.values())
    else:
        for s in ds:
            rows += 1
            nbytes += sum(v.numel() * v.element_size() for v in s.values())
    return time.perf_counter() - t0, rows, nbytes


@contextlib.contextmanager
def http_service(root: Path, spec: dict[str, Any], cache_id: str) -> Iterator[str | None]:
    """The kdcache service on a loopback port; yields the cache URL (None if unavailable)."""
    try:
        import httpx
        import uvicorn

        from kdcache.service import Settings, create_app
    except ImportError as err:
        print(f"  (HTTP skipped: {err})")
        yield None
        return
    settings = Settings(root=str(root), admin_token="bench-admin", worker_token="bench-worker")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        headers = {"Authorization": "Bearer bench-admin"}
        httpx.post(f"{base}/v1/jobs", json=spec, headers=headers, timeout=60).raise_for_status()
        yield f"{base}/v1/caches/{cache_id}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def s3_bucket(url: str) -> Iterator[tuple[str, dict[str, Any]] | None]:
    """moto's S3 on a loopback port with the cache uploaded; yields (s3 URL, storage_options)."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        print(f"  (S3 skipped: {err})")
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "key": "x",
        "secret": "x",
    }
    try:
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("bench")
        fs.put(url, f"bench/caches/{Path(url).name}", recursive=True)
        yield f"s3://bench/caches/{Path(url).name}", opts
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--rows-per-shard", type=int, default=128)
    p.add_argument("--fields", default="input_ids,topk,hidden_2")
    p.add_argument("--sources", default="local,http,s3")
    p.add_argument("--threads", type=int, default=4, help="read/decode threads")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kdcache-bench"))
    args = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request

    url, spec, root = build_cache(args)
    fields = args.fields.split(",")
    probe = CacheDataset(url, fields=fields)
    m = probe.manifest
    from kdcache.client._fields import stored_arrays
    from kdcache.client.cache import open_reader

    arrays = list(stored_arrays(probe.fields, open_reader(url).arrays).values())
    files = shard_files(url, arrays)
    stored = sum(f.stat().st_size for f in files)
    tokens = m.num_rows * m.seq_len
    print(
        f"cache {url}\n  {m.num_rows} rows x {m.seq_len} tokens, top-{m.topk}, hidden "
        f"{m.hidden_layers} (d={m.hidden_size}); fields {probe.fields}; "
        f"{stored / 1e6:.1f} MB stored in {len(files)} shard files; {os.cpu_count()} CPUs"
    )
    raw_s = best(lambda: raw_read(files), args.repeat)
    chunks = chunks_in_memory(url, arrays)
    dec_s = best(lambda: decode_only(chunks, args.threads), args.repeat)
    rows_: list[tuple[str, float, float]] = [
        ("raw read (cat-like)", raw_s, float("nan")),
        (f"decode only ({args.threads} threads)", dec_s, float("nan")),
    ]

    def measure(name: str, make: Callable[[], CacheDataset], workers: int = 0) -> None:
        secs = []
        for _ in range(args.repeat):
            s, n, nbytes = epoch(make, workers, 8)
            secs.append((s, nbytes))
        s, nbytes = min(secs)
        rows_.append((name, s, nbytes / s / 1e6))

    kw = {"fields": fields, "seed": 0, "read_threads": args.threads}
    sources = args.sources.split(",")
    if "local" in sources:
        measure("CacheDataset local", lambda: CacheDataset(url, **kw))
        measure("CacheDataset local, 2 workers", lambda: CacheDataset(url, **kw), workers=2)
    if "http" in sources:
        with http_service(root, spec, m.cache_id) as http:
            if http:
                measure("CacheDataset HTTP (ranged reads)", lambda: CacheDataset(http, **kw))
                measure(
                    "CacheDataset HTTP + disk cache (cold)",
                    lambda: CacheDataset(http, cache_dir=tempfile.mkdtemp(), **kw),
                )
    if "s3" in sources:
        with s3_bucket(url) as s3:
            if s3:
                s3url, opts = s3
                kws = {**kw, "storage_options": opts}
                measure("CacheDataset S3 (ranged reads)", lambda: CacheDataset(s3url, **kws))
                measure(
                    "CacheDataset S3 + disk cache (cold)",
                    lambda: CacheDataset(s3url, cache_dir=tempfile.mkdtemp(), **kws),
                )
    head = ("", "tokens/s", "MB/s", "tensor MB/s", "/ raw", "/ decode")
    print("\n  {:40s} {:>12s} {:>9s} {:>12s} {:>7s} {:>9s}".format(*head))
    for name, s, tensor_mbs in rows_:
        mbs = stored / s / 1e6
        print(
            f"  {name:40s} {tokens / s:12,.0f} {mbs:9.1f} {tensor_mbs:12.1f} "
            f"{raw_s / s:7.2f} {dec_s / s:9.2f}"
        )


if __name__ == "__main__":
    main()
