#!/usr/bin/env python
"""Bytes and error of each ``outputs.hidden_codec`` on the demo teacher, and the demo students.

The teacher runs once (``kdcache``'s embedded runner: the demo's job, top-32, temperatures 1
and 2, ``uniform:2`` hidden layers, kept in float32); every codec's cache is then written from
those float32 states with the worker's own coding (``worker.hidden_coding.encode_hidden``, the
basis fitted on the first rows as a worker does), so it holds the bytes a teacher pass with
that ``hidden_codec`` writes, without running the teacher again. One table, side by side:

- hidden bytes/token: the stored bytes of ``hidden/``, ``hidden_scale/`` and ``hidden_pca/``
  (every file, Zarr metadata and the pca basis included) over the cached tokens, and two
  ratios: to the stored bfloat16 ``exact`` cache (bf16 after Blosc/zstd), and to the raw
  bfloat16 bytes (2 d per layer and token, what "0.52x the bfloat16 bytes" counts before any
  compression);
- relative error per token, ``||decoded - h|| / ||h||`` against the teacher's float32 hidden
  states (a float32 ``exact`` cache): mean and 99th percentile over tokens and layers;
- with ``--students``: the held-out loss (nats/token) of the demo's ``kd+hidden`` student
  trained from each cache (same init, batches and steps), beside a ``kd``-only student.

The teacher is the demo's: ``--teacher-dir DIR`` reuses one laid out as ``DIR/teacher`` (HF
dir with tokenizer), ``DIR/train.npy`` and ``DIR/heldout.npy`` (what ``bench/storage.py``
trains at vocab 2048); without it, ``examples/demo.py``'s own teacher is trained into ``--out``
(once). ``measure()`` is the reusable part.

Usage: ``python bench/hidden_codecs.py [--teacher-dir DIR] [--out DIR] [--students]
[--student-codecs exact,int8,pca:32] [--kd-baseline]``
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CODECS = ("exact", "int8", "int6", "int5", "int4", "fp8", "pca:64", "pca:32", "pca:16")
HIDDEN_PREFIXES = ("hidden/", "hidden_scale/", "hidden_pca/")


def demo_module() -> ModuleType:
    """``examples/demo.py`` as a module (it is a script, not a package)."""
    name = "kdcache_demo_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "demo.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def teacher(args: argparse.Namespace) -> tuple[Path, np.ndarray, np.ndarray]:
    """(teacher dir, train rows, held-out rows): ``--teacher-dir``'s, or the demo's (made once)."""
    base = Path(args.teacher_dir) if args.teacher_dir else Path(args.out) / "demo-teacher"
    if (base / "train.npy").is_file() and (base / "teacher" / "config.json").is_file():
        return base / "teacher", np.load(base / "train.npy"), np.load(base / "heldout.npy")
    if args.teacher_dir:
        raise SystemExit(f"{base} has no teacher/, train.npy and heldout.npy")
    demo = demo_module()
    base.mkdir(parents=True, exist_ok=True)
    teacher_dir, train, val = demo.make_teacher(demo.FULL, args.seed, base)
    np.save(base / "heldout.npy", val)
    np.save(base / "train.npy", train)
    return teacher_dir, train, val


def cache_spec(teacher_dir: Path, tokens: Path, codec: str, hidden_dtype: str = "bfloat16") -> Any:
    from kdcache.core.spec import parse_spec

    return parse_spec(
        {
            "name": f"hidden-codec-{codec}",
            "teacher": {"hf": str(teacher_dir), "dtype": "float32", "device": "cpu"},
            "dataset": {"tokens": str(tokens)},
            "outputs": {
                "topk": 32,
                "temperatures": [1.0, 2.0],
                "hidden_layers": "uniform:2",
                "hidden_dtype": hidden_dtype,
                "hidden_codec": codec,
            },
            "batch_size": 16,
            "rows_per_shard": 256,
        }
    )


def hidden_bytes(cache: str) -> int:
    """Stored bytes of every hidden-state file of a cache (codes, scales, basis, metadata)."""
    base = Path(cache)
    return sum(
        p.stat().st_size
        for p in base.rglob("*")
        if p.is_file() and p.relative_to(base).as_posix().startswith(HIDDEN_PREFIXES)
    )


def rel_errors(cache: str, ref: dict[int, np.ndarray]) -> np.ndarray:
    """Per-token relative L2 error of a cache's decoded hidden states against ``ref``."""
    from kdcache.client import TeacherCache

    tc = TeacherCache(cache, decode_hidden=True)
    rows = np.arange(tc.manifest.num_rows)
    batch = tc.batch(rows, ["hidden"])
    errs = []
    for layer, h in ref.items():
        got = batch[f"hidden_{layer}"].double().numpy()
        errs.append(np.linalg.norm(got - h, axis=-1) / np.linalg.norm(h, axis=-1))
    return np.concatenate([e.reshape(-1) for e in errs])


def recode(ref_url: str, spec: Any, root: Path) -> str:
    """Write ``spec``'s cache (same job, another hidden codec) from the float32 cache at
    ``ref_url``, coding its hidden states as a worker would; returns the cache's path."""
    from kdcache.core.format import hidden_array
    from kdcache.core.hidden_basis import write_basis
    from kdcache.core.hidden_codec import fit_pca, parse_hidden_codec, pca_fit_rows, to_storage
    from kdcache.core.layout import cache_url
    from kdcache.core.reader import CacheReader
    from kdcache.core.resolve import resolve_job
    from kdcache.core.writer import CacheWriter
    from kdcache.worker.hidden_coding import encode_hidden

    ref = CacheReader(ref_url)
    codec = parse_hidden_codec(spec.outputs.hidden_codec)
    m = replace(
        ref.manifest,
        cache_id=resolve_job(spec).cache_id,
        name=spec.name,
        hidden_dtype=spec.outputs.hidden_dtype,
        hidden_codec=codec.name,
        format_version=1 if codec.kind == "exact" else 2,
    )
    writer = CacheWriter.open(cache_url(root, m.cache_id), m)
    if not writer.missing_shards():
        return writer.storage.url
    basis = None
    if codec.kind == "pca":
        n = pca_fit_rows(codec.rank, m.num_rows, m.seq_len)
        basis = {
            layer: fit_pca(ref.read(hidden_array(layer), slice(0, n)), codec.rank)
            for layer in m.hidden_layers
        }
        write_basis(writer.group, writer.storage, m, basis, n)
    for shard in writer.missing_shards():
        lo, hi = m.shard_rows(shard)
        data = {a.name: ref.read(a.name, slice(lo, hi)) for a in ref.manifest.arrays()}
        if codec.kind == "exact":
            for layer in m.hidden_layers:
                data[hidden_array(layer)] = to_storage(data[hidden_array(layer)], m.hidden_dtype)
        encode_hidden(data, m, basis)
        writer.commit(writer.write_shard(shard, data))
    return writer.storage.url


def measure(
    teacher_dir: Path, train: np.ndarray, codecs: Sequence[str], work: Path
) -> list[dict[str, Any]]:
    """One row per codec: hidden bytes/token, ratio to bfloat16 exact, relative error (mean,
    p99), the cache path and the seconds coding took."""
    from kdcache.core.reader import CacheReader
    from kdcache.worker.runner import run_job

    work.mkdir(parents=True, exist_ok=True)
    tokens = work / "train.npy"
    np.save(tokens, train)
    root = work / "root"
    ref_cache = run_job(cache_spec(teacher_dir, tokens, "exact", "float32"), root)
    reader = CacheReader(ref_cache)
    ref = {
        layer: reader.read(f"hidden/{layer}", slice(None)).astype(np.float64)
        for layer in reader.manifest.hidden_layers
    }
    n_tokens = reader.manifest.num_tokens
    raw_bf16 = 2 * (reader.manifest.hidden_size or 0) * len(ref)  # bytes/token, uncompressed
    rows = []
    for codec in codecs:
        t0 = time.perf_counter()
        cache = recode(ref_cache, cache_spec(teacher_dir, tokens, codec), root)
        seconds = time.perf_counter() - t0
        err = rel_errors(cache, ref)
        rows.append(
            {
                "codec": codec,
                "cache": cache,
                "bytes_per_token": hidden_bytes(cache) / n_tokens,
                "rel_err_mean": float(err.mean()),
                "rel_err_p99": float(np.quantile(err, 0.99)),
                "seconds": seconds,
                "raw_ratio": hidden_bytes(cache) / n_tokens / raw_bf16,
            }
        )
    base = next((r["bytes_per_token"] for r in rows if r["codec"] == "exact"), None)
    for r in rows:
        r["ratio"] = r["bytes_per_token"] / base if base else float("nan")
    return rows


def students(
    rows: list[dict[str, Any]],
    train: np.ndarray,
    val: np.ndarray,
    steps: int,
    seed: int,
    kd_baseline: bool = False,
) -> dict[str, float]:
    """Held-out loss of the demo's kd+hidden student per codec, and of a kd-only student."""
    import torch

    from kdcache.client import TeacherCache

    demo = demo_module()
    sizes = replace(demo.FULL, student_steps=steps)
    order = demo.batches(len(train), sizes.batch, steps, seed + 2)
    runs = [("kd+hidden", r["codec"], r["cache"]) for r in rows]
    if kd_baseline and rows:
        runs.append(("kd", "kd (no hidden)", rows[0]["cache"]))
    held = {}
    for mode, key, path in runs:
        torch.manual_seed(seed)
        student = demo.train_student(mode, TeacherCache(path), sizes, order, seed + 3)
        held[key] = demo.heldout_loss(student, val)
        print(f"  student {mode:<10} {key:<16} held-out {held[key]:.4f}", flush=True)
    return held


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-dir", help="DIR with teacher/, train.npy, heldout.npy")
    p.add_argument("--out", default="bench-out/hidden-codecs", help="work directory")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--students", action="store_true", help="train the demo students too")
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--student-codecs", help="codecs to train students for (default: all)")
    p.add_argument("--kd-baseline", action="store_true", help="also a kd-only student")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    teacher_dir, train, val = teacher(args)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher_dir)
    print(
        f"teacher {teacher_dir}: d={cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"vocab {cfg.vocab_size}; {train.shape[0]} x {train.shape[1]} training tokens",
        flush=True,
    )
    rows = measure(teacher_dir, train, args.codecs.split(","), Path(args.out))
    print_table(rows, {})
    picked = args.student_codecs.split(",") if args.student_codecs else args.codecs.split(",")
    if args.students:
        chosen = [next(r for r in rows if r["codec"] == c) for c in picked]
        held = students(chosen, train, val, args.student_steps, args.seed, args.kd_baseline)
        print_table(rows, held)
    return 0


def print_table(rows: list[dict[str, Any]], held: dict[str, float]) -> None:
    print(
        "\n| hidden_codec | hidden bytes/token (2 layers) | vs stored bf16 exact | vs raw bf16 "
        "| rel. error mean | rel. error p99 |" + (" student held-out loss |" if held else "")
    )
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if held else ""))
    for r in rows:
        line = (
            f"| {r['codec']} | {r['bytes_per_token']:.1f} | {r['ratio']:.3f} | "
            f"{r['raw_ratio']:.3f} | {r['rel_err_mean']:.2e} | {r['rel_err_p99']:.2e} |"
        )
        if held:
            line += f" {held[r['codec']]:.4f} |" if r["codec"] in held else " |"
        print(line)
    if "kd (no hidden)" in held:
        print(f"| (kd student, no hidden loss) | | | | | | {held['kd (no hidden)']:.4f} |")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
