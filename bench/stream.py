"""How fast CacheDataset delivers a cache, next to how fast its bytes can be read and decoded.

    python bench/stream.py                       # local, HTTP (service) and S3 (moto)
    python bench/stream.py --sources local --rows 2048 --workdir /data/bench

Builds (once, under --workdir) a cache from a random-init teacher with today's writer, and a copy
of it recoded with the settings of before issue 10 ("old": zstd level 3 everywhere, inner chunks
of up to 1 MiB of rows; "new": zstd level 1 for hidden states, ids and masks, at most 64 KiB of
rows per chunk so a reader decodes only the rows it wants). For each, on the same stored bytes of
the fields read, it measures side by side:

- raw read: every shard file read like ``cat`` (8 MiB reads; hot page cache after the first pass);
- decode only: every stored chunk decompressed from memory (Blosc, ``--threads`` threads), no
  I/O; "+ crc" also checks each chunk's CRC-32C, the rest of the stored codec chain; "-> batch
  dtypes" also casts into what a batch carries (int64 ids, float32 log-probabilities), in
  fresh outputs per epoch as CacheDataset has: like with like for the "/ dec->batch" columns;
- CacheDataset: one shuffled epoch, rows handed to the caller; and through ``ds.loader()`` with
  0 and 2 DataLoader workers (batches collated as training gets them), blocks decoded into fresh
  or reused memory; "torch's tensors": workers' batches sent as torch pickles tensors, which is
  what ``pin_memory=True`` on a GPU host took before the loader pinned packed batches itself;
- for the new cache only: the HTTP service and S3 (moto).

MB/s are stored (compressed) bytes per second, so the rows compare directly; "tensor MB/s" is
what the caller receives. HTTP runs the kdcache service under uvicorn and S3 runs moto, both in
this process, so they compete with the client for the interpreter: read those as lower bounds.
A "training loop" table then times an epoch of the new cache under a consumer that does work
per batch (``--consumers``), against the consumer alone, for each worker count:

- ``gpu:OPS:MS`` stands for a step on an accelerator: OPS tiny torch ops (each releases the GIL
  and takes it back, as a kernel launch does) then MS ms waiting with the GIL released (as on a
  CUDA synchronisation); the main process's CPU is mostly idle;
- ``python:MS`` holds the GIL for MS ms per batch (a Python-heavy step);
- ``torch:MS`` runs torch matrix products for MS ms per batch (a CPU student: every core busy).

Without workers the dataset decodes in threads of the training process, which then wait for the
GIL behind the loop (and the loop behind them); workers decode in processes of their own.

A last table prints, for the hidden-state array alone, stored bytes and decode-only speed of
zstd level 3, zstd level 1 and lz4 (the size-vs-decode-speed choice the writer makes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import google_crc32c
import numcodecs.blosc
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

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


def recode(url: str, dst: Path, old: bool) -> str:
    """A copy of the cache at ``url`` under ``dst`` with the codecs and chunking of before issue
    10 (``old``) or of today's writer; completion records are copied (their checksums cover
    decoded values, which recoding keeps)."""
    from kdcache.core.format import CHUNK_TARGET_BYTES, Manifest, plan_chunks
    from kdcache.core.writer import _clevel

    out = dst / Path(url).name
    if (out / "_kdcache").exists():
        return str(out)
    src = zarr.open_group(url, mode="r")
    m = Manifest.from_dict(dict(src.attrs["kdcache"]))  # type: ignore[arg-type]
    group = zarr.open_group(str(out), mode="w", attributes=dict(src.attrs))
    per = m.rows_per_shard
    for spec in m.arrays():
        a = src[spec.name]
        assert isinstance(a, zarr.Array)
        itemsize = np.dtype(a.dtype).itemsize
        if old:
            chunks = plan_chunks(spec.row_shape, itemsize, per, row_target=CHUNK_TARGET_BYTES)
        else:
            chunks = plan_chunks(spec.row_shape, itemsize, per)
        shuffle: Literal["bitshuffle", "shuffle"] = (
            "bitshuffle" if spec.shuffle == "bitshuffle" else "shuffle"
        )
        level = 3 if old else _clevel(spec.name)
        new = group.create_array(
            spec.name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=chunks,
            shards=(per, *spec.row_shape),
            compressors=(BloscCodec(cname="zstd", clevel=level, shuffle=shuffle), Crc32cCodec()),
            fill_value=0,
            attributes=dict(a.attrs),
        )
        new.with_config({"write_empty_chunks": True})[:] = a[:]
    shutil.copytree(Path(url) / "_kdcache", out / "_kdcache")
    return str(out)


def shard_files(url: str, arrays: list[str]) -> list[Path]:
    return sorted(p for a in arrays for p in (Path(url) / a / "c").rglob("*") if p.is_file())


@dataclass(frozen=True)
class Cost:
    """Wall seconds, and CPU seconds of this process's threads plus DataLoader workers that
    ended (the machine may be shared: CPU seconds per byte are what load changes least)."""

    wall: float
    cpu: float


def timed(fn: Callable[[], int]) -> tuple[Cost, int]:
    """(cost, result) of one call of ``fn``."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime
    return Cost(wall, time.process_time() - c0 + child), out


def best(fn: Callable[[], int], repeat: int) -> tuple[Cost, int]:
    """The least wall and the least CPU seconds of ``repeat`` calls, and the last result."""
    runs = [timed(fn) for _ in range(repeat)]
    return Cost(min(c.wall for c, _ in runs), min(c.cpu for c, _ in runs)), runs[-1][1]


def raw_read(files: list[Path]) -> int:
    n = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while block := f.read(8 << 20):
                n += len(block)
    return n


def chunks_in_memory(url: str, arrays: list[str]) -> list[bytes]:
    """Every stored inner chunk of ``arrays`` (with its CRC-32C), sliced out of its shard."""
    return [c for name in arrays for c in chunks_of(url, name)]


def chunks_of(url: str, name: str) -> list[bytes]:
    """The stored inner chunks of one array, in shard and chunk order."""
    out: list[bytes] = []
    meta = json.loads((Path(url) / name / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    n = int(np.prod([s // i for s, i in zip(shard, inner, strict=True)]))
    for path in shard_files(url, [name]):
        blob = path.read_bytes()
        index = np.frombuffer(blob[-(16 * n + 4) : -4], dtype="<u8").reshape(n, 2)
        out += [blob[o : o + k] for o, k in index.tolist() if o != 2**64 - 1]
    return out


def _blosc(chunk: bytes) -> bytes:
    return numcodecs.blosc.decompress(memoryview(chunk)[:-4])


def _chain(chunk: bytes) -> bytes:
    if google_crc32c.value(chunk) != 0x48674BC7:  # CRC-32C residue of data + its checksum
        raise ValueError("corrupt chunk")
    return numcodecs.blosc.decompress(memoryview(chunk)[:-4])


def decode_only(chunks: list[bytes], threads: int, decode: Callable[[bytes], bytes]) -> int:
    with ThreadPoolExecutor(threads) as pool:
        return sum(len(out) for out in pool.map(decode, chunks, chunksize=4))


@dataclass(frozen=True)
class Field:
    """One field of the batch: its array's stored chunks, stored and batch dtypes."""

    chunks: list[bytes]
    stored: np.dtype[Any]
    batch: np.dtype[Any]


def decode_to_batch(fields: list[Field], threads: int) -> int:
    """Decode-only that produces what a batch carries: every chunk checked (CRC-32C),
    decompressed and cast into the batch dtype (int64 ids, float32 log-probs) in one output
    per field, allocated per call as CacheDataset allocates its blocks. No file I/O, no
    shuffling, no row placement. Returns the bytes produced."""
    from kdcache.client._shardread import _cast_into, _scratch_array

    sizes = [sum(_decoded(c) for c in f.chunks) // f.stored.itemsize for f in fields]
    specs = [((n,), f.batch) for n, f in zip(sizes, fields, strict=True)]
    try:  # the memory CacheDataset decodes into (kdcache before issue 10's arena: np.empty)
        from kdcache.client._shm import Arena

        outs = Arena(specs).arrays
    except ImportError:
        outs = [np.empty(shape, dt) for shape, dt in specs]
    work = []
    for f, out in zip(fields, outs, strict=True):
        at = 0
        for c in f.chunks:
            n = _decoded(c) // f.stored.itemsize
            work.append((c, f.stored, out[at : at + n]))
            at += n

    def one(item: tuple[bytes, np.dtype[Any], np.ndarray]) -> int:
        chunk, stored, dst = item
        if google_crc32c.value(chunk) != 0x48674BC7:
            raise ValueError("corrupt chunk")
        if stored == dst.dtype:
            numcodecs.blosc.decompress(memoryview(chunk)[:-4], dst)
        else:
            tmp = _scratch_array((len(dst),), stored)
            numcodecs.blosc.decompress(memoryview(chunk)[:-4], tmp)
            _cast_into(dst, tmp)
        return dst.nbytes

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, work, chunksize=4))


def _decoded(chunk: bytes) -> int:
    """Decompressed size from the Blosc header (bytes 4..8)."""
    return int.from_bytes(chunk[4:8], "little")


def epoch(
    make: Callable[[], CacheDataset],
    workers: int | None,
    batch: int,
    recycle: bool = True,
    pack: bool = True,
) -> int:
    """Tensor bytes of one shuffled epoch handed to the caller: rows one by one (``workers``
    None) or batches through ``ds.loader`` with ``workers`` DataLoader workers (``recycle``:
    blocks decoded into memory reused once the caller let go of an earlier block, else fresh
    memory for each, as before; ``pack`` False: workers' batches cross as torch's own tensors,
    the path a DataLoader that pins needed before the loader pinned them itself)."""
    from kdcache.client import _shm

    ds = make()
    nbytes = 0
    kw: dict[str, Any] = {"multiprocessing_context": "fork"} if workers else {}
    _shm.REUSE = recycle
    try:
        if workers is not None:
            loader = ds.loader(batch_size=batch, num_workers=workers, **kw)
            loader._batches.pack = pack
            for b in loader:
                nbytes += sum(v.numel() * v.element_size() for v in b.values())
        else:
            for s in ds:
                nbytes += sum(v.numel() * v.element_size() for v in s.values())
    finally:
        _shm.REUSE = True
    return nbytes


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


Row = tuple[str, str, Cost, float, float, Cost]  # settings, what, cost, stored, tensor, decode


class Table:
    """Rows measured so far, printed side by side at the end."""

    def __init__(self, args: argparse.Namespace, tokens: int) -> None:
        self.args, self.tokens = args, tokens
        self.rows: list[Row] = []
        self.to_batch: dict[str, Cost] = {}  # settings -> decode-only into the batch dtypes

    def add(
        self, settings: str, what: str, fn: Callable[[], int], stored: float, dec: Cost
    ) -> Cost:
        cost, nbytes = best(fn, self.args.repeat)
        self.rows.append((settings, what, cost, stored, nbytes / cost.wall / 1e6, dec))
        return cost

    def print(self) -> None:
        head = (
            *("", "", "tokens/s", "MB/s", "tensor MB/s", "/ decode", "CPU s", "/ dec CPU"),
            *("/ dec->batch", "CPU"),
        )
        line = "  {:4s} {:56s} {:>11s} {:>8s} {:>11s} {:>8s} {:>6s} {:>9s} {:>12s} {:>5s}"
        print("\n" + line.format(*head))
        nan = Cost(float("nan"), float("nan"))
        for settings, what, c, stored, tensor_mbs, dec in self.rows:
            tb = self.to_batch.get(settings, nan)
            print(
                f"  {settings:4s} {what:56s} {self.tokens / c.wall:11,.0f} "
                f"{stored / c.wall / 1e6:8.1f} {tensor_mbs:11.1f} {dec.wall / c.wall:8.2f} "
                f"{c.cpu:6.2f} {dec.cpu / c.cpu:9.2f} {tb.wall / c.wall:12.2f} "
                f"{tb.cpu / c.cpu:5.2f}"
            )


def batch_fields(url: str, arrays: list[str]) -> list[Field]:
    """The fields a batch carries for ``arrays``, with the dtypes CacheDataset gives them."""
    from kdcache.client._blocks import TENSOR_DTYPES
    from kdcache.client._fields import TOPK_KEYS

    by_array = {"input_ids": "input_ids", **{a: f for f, a in TOPK_KEYS.items()}}
    out = []
    for name in arrays:
        stored = np.dtype(zarr.open_array(str(Path(url) / name), mode="r").dtype)
        batch = TENSOR_DTYPES.get(by_array.get(name, ""), stored)
        out.append(Field(chunks_of(url, name), stored, batch))
    return out


def measure_local(
    table: Table, settings: str, url: str, arrays: list[str], kw: dict[str, Any]
) -> Cost:
    """Rows of ``table`` for one local cache; returns its decode-only (blosc + crc) cost."""
    args, nan = table.args, float("nan")
    files = shard_files(url, arrays)
    stored = float(sum(f.stat().st_size for f in files))
    chunks = chunks_in_memory(url, arrays)
    print(
        f"  {settings}: {stored / 1e6:.1f} MB stored in {len(files)} shard files, "
        f"{len(chunks)} chunks"
    )
    dec, _ = best(lambda: decode_only(chunks, args.threads, _chain), args.repeat)
    threads = f"{args.threads} threads"
    table.add(settings, "raw read (cat-like)", lambda: 0 * raw_read(files), stored, dec)
    table.add(
        settings,
        f"decode only, blosc ({threads})",
        lambda: 0 * decode_only(chunks, args.threads, _blosc),
        stored,
        dec,
    )
    table.rows.append((settings, f"decode only, blosc + crc ({threads})", dec, stored, nan, dec))
    fields = batch_fields(url, arrays)
    to_batch = table.add(
        settings,
        f"decode only -> batch dtypes ({threads})",
        lambda: decode_to_batch(fields, args.threads),
        stored,
        dec,
    )
    table.to_batch[settings] = to_batch
    make = lambda: CacheDataset(url, **kw)  # noqa: E731
    table.add(settings, "CacheDataset local, rows", lambda: epoch(make, None, 0), stored, dec)
    for w in args.workers:
        for recycle, pack in ((False, True), (True, True), (True, False))[: 3 if w else 2]:

            def loader(w: int = w, recycle: bool = recycle, pack: bool = pack) -> int:
                return epoch(make, w, args.batch_size, recycle, pack)

            how = "reused mem" if recycle else "fresh mem"
            how = how if pack else "torch's tensors"
            name = f"CacheDataset local, loader, {w} workers, {how}"
            table.add(settings, name, loader, stored, dec)
    return dec


@dataclass(frozen=True)
class Consumer:
    """Work a training loop does per batch (see the module docstring)."""

    kind: Literal["gpu", "python", "torch"]
    ms: float
    ops: int = 0

    @classmethod
    def parse(cls, text: str) -> Consumer:
        kind, *rest = text.split(":")
        if kind == "gpu" and len(rest) == 2:
            return cls("gpu", float(rest[1]), int(rest[0]))
        if kind in ("python", "torch") and len(rest) == 1:
            return cls(kind, float(rest[0]))  # type: ignore[arg-type]
        raise SystemExit(f"--consumers: {text!r} is not gpu:OPS:MS, python:MS or torch:MS")

    def __str__(self) -> str:
        if self.kind == "gpu":
            return f"gpu-like: {self.ops} torch ops + {self.ms:g} ms GIL-free wait"
        if self.kind == "python":
            return f"python: {self.ms:g} ms holding the GIL"
        return f"torch: {self.ms:g} ms of matrix products"

    def step(self) -> Callable[[], None]:
        x, w = torch.zeros(4), torch.randn(256, 256)
        secs = self.ms / 1e3

        def gpu() -> None:
            for _ in range(self.ops):
                torch.add(x, 1, out=x)
            time.sleep(secs)

        def python() -> None:
            end = time.perf_counter() + secs
            while time.perf_counter() < end:
                pass

        def products() -> None:
            end = time.perf_counter() + secs
            while time.perf_counter() < end:
                torch.mm(w, w)

        return {"gpu": gpu, "python": python, "torch": products}[self.kind]


def consumer_table(make: Callable[[], CacheDataset], args: argparse.Namespace) -> None:
    """An epoch of batches under each consumer: alone, and fed by each worker count; the runs
    alternate, and medians are compared (without workers the epoch varies most from run to run,
    so a best-of would hide what a training loop gets)."""
    batches = len(make().loader(batch_size=args.batch_size))
    print(
        f"\n  training loop over the new cache: {batches} batches of {args.batch_size} rows; "
        f"epoch seconds, median (min-max) of {args.repeat} alternated runs; 'loop alone' runs "
        "the steps without data"
    )
    cols = ["loop alone", *(f"{w} workers" for w in args.workers)]
    print(f"  {'consumer per batch':46s} " + " ".join(f"{c:>17s}" for c in cols) + "  workers vs 0")
    for text in args.consumers:
        consumer = Consumer.parse(text)
        step = consumer.step()

        def alone(step: Callable[[], None] = step) -> int:
            for _ in range(batches):
                step()
            return 0

        def fed(w: int, step: Callable[[], None] = step) -> int:
            kw: dict[str, Any] = {"multiprocessing_context": "fork"} if w else {}
            for _ in make().loader(batch_size=args.batch_size, num_workers=w, **kw):
                step()
            return 0

        runs: dict[str, list[float]] = {c: [] for c in cols}
        for _ in range(args.repeat):
            runs["loop alone"].append(timed(alone)[0].wall)
            for w in args.workers:
                runs[f"{w} workers"].append(timed(partial(fed, w))[0].wall)
        med = {c: float(np.median(v)) for c, v in runs.items()}
        cells = [f"{med[c]:.2f} ({min(runs[c]):.2f}-{max(runs[c]):.2f})" for c in cols]
        ratio = ""
        if 0 in args.workers and len(args.workers) > 1:
            w_best = min((w for w in args.workers if w), key=lambda w: med[f"{w} workers"])
            ratio = f"  {med['0 workers'] / med[f'{w_best} workers']:.2f}x ({w_best} workers)"
        print(f"  {str(consumer):46s} " + " ".join(f"{c:>17s}" for c in cells) + ratio)


def codec_table(url: str, name: str, threads: int, repeat: int) -> None:
    """Stored bytes and decode-only speed of one array under three Blosc compressors."""
    meta = json.loads((Path(url) / name / "zarr.json").read_text())
    inner = tuple(meta["codecs"][0]["configuration"]["chunk_shape"])
    a = zarr.open_array(str(Path(url) / name), mode="r")
    data = np.ascontiguousarray(a[: min(a.shape[0], 256)])
    step = inner[0]
    pieces = [data[i : i + step].tobytes() for i in range(0, len(data), step)]
    print(f"\n  {name}: {data.nbytes / 1e6:.1f} MB of {data.dtype} in chunks of {inner}")
    print(
        "  {:24s} {:>8s} {:>16s} {:>14s}".format(
            "blosc compressor", "ratio", "decode MB/s out", "encode MB/s"
        )
    )
    for cname, level in (("zstd", 3), ("zstd", 1), ("lz4", 5)):
        codec = numcodecs.Blosc(cname=cname, clevel=level, shuffle=numcodecs.Blosc.SHUFFLE)
        t0 = time.perf_counter()
        enc = [codec.encode(p) for p in pieces]
        enc_s = time.perf_counter() - t0
        size = sum(len(e) for e in enc)
        dec_s = best(partial(decode_only, enc, threads, numcodecs.blosc.decompress), repeat)[0].wall
        print(
            f"  {cname + ' level ' + str(level):24s} {data.nbytes / size:8.2f} "
            f"{data.nbytes / dec_s / 1e6:16.0f} {data.nbytes / enc_s / 1e6:14.0f}"
        )


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
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts to measure")
    p.add_argument(
        "--shuffle-window",
        type=int,
        default=0,
        help="CacheDataset shuffle_window in rows (0: its default, 256 MiB of rows)",
    )
    p.add_argument(
        "--consumers",
        default="gpu:200:2,python:2,torch:2",
        help="training-loop work per batch for the loop table (none: skip it)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kdcache-bench"))
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.consumers = [c for c in args.consumers.split(",") if c and c != "none"]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request

    built, spec, root = build_cache(args)
    base = root.parent
    caches = {
        "old": recode(built, base / "recoded-old", old=True),
        "new": recode(built, base / "recoded-new", old=False),
    }
    url = caches["new"]
    fields = args.fields.split(",")
    probe = CacheDataset(url, fields=fields)
    m = probe.manifest
    from kdcache.client._fields import stored_arrays
    from kdcache.client.cache import open_reader

    arrays = list(stored_arrays(probe.fields, open_reader(url).arrays).values())
    print(
        f"cache {m.cache_id}\n  {m.num_rows} rows x {m.seq_len} tokens, top-{m.topk}, hidden "
        f"{m.hidden_layers} (d={m.hidden_size}); fields {probe.fields}; {os.cpu_count()} CPUs"
    )
    table = Table(args, m.num_rows * m.seq_len)
    kw = {"fields": fields, "seed": 0, "read_threads": args.threads}
    if args.shuffle_window:  # smaller windows: many blocks per epoch, as a large cache has
        kw["shuffle_window"] = args.shuffle_window
    sources = args.sources.split(",")
    dec = Cost(float("nan"), float("nan"))
    if "local" in sources:
        for settings, where in caches.items():
            dec = measure_local(table, settings, where, arrays, kw)  # the new cache's is last
    stored = float(sum(f.stat().st_size for f in shard_files(url, arrays)))

    def remote(what: str, make: Callable[[], CacheDataset]) -> None:
        table.add("new", what, lambda: epoch(make, None, 0), stored, dec)

    if "http" in sources:
        with http_service(root, spec, m.cache_id) as http:
            if http:
                remote("CacheDataset HTTP (ranged reads)", lambda: CacheDataset(http, **kw))
                remote(
                    "CacheDataset HTTP + disk cache (cold)",
                    lambda: CacheDataset(http, cache_dir=tempfile.mkdtemp(), **kw),
                )
    if "s3" in sources:
        with s3_bucket(url) as s3:
            if s3:
                s3url, opts = s3
                kws = {**kw, "storage_options": opts}
                remote("CacheDataset S3 (ranged reads)", lambda: CacheDataset(s3url, **kws))
                remote(
                    "CacheDataset S3 + disk cache (cold)",
                    lambda: CacheDataset(s3url, cache_dir=tempfile.mkdtemp(), **kws),
                )
    table.print()
    if args.consumers:
        consumer_table(lambda: CacheDataset(url, **kw), args)
    hidden = [a for a in arrays if a.startswith("hidden/")]
    if hidden:
        codec_table(url, hidden[0], args.threads, args.repeat)


if __name__ == "__main__":
    main()
