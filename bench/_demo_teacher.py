"""The storage benchmark's teacher: the demo's trained Llama at a larger vocabulary, made once.

``ensure_teacher(DIR)`` reuses DIR when it holds a finished teacher (``README.txt`` is written
last), else trains one there with ``examples/demo.py``'s own pieces (``make_teacher``) and saves
the training and held-out token arrays beside it::

    DIR/teacher/        tokenizer + LlamaForCausalLM (from_pretrained-loadable)
    DIR/train.npy       (N, T) int32 training rows (what the cache is made of)
    DIR/heldout.npy     (M, T) int32 held-out rows (students are scored on these)
    DIR/README.txt      how it was made: sizes, seed, steps, seconds, last loss
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def demo_module() -> ModuleType:
    """``examples/demo.py`` imported as a module (it is a script, not a package)."""
    name = "kdcache_demo_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ensure_teacher(
    out: Path, *, vocab: int = 2048, steps: int | None = None, seed: int = 0
) -> tuple[Path, np.ndarray, np.ndarray]:
    """(teacher dir, train rows, held-out rows): reused from ``out`` or trained there."""
    out = Path(out)
    readme = out / "README.txt"
    if readme.is_file():
        return out / "teacher", np.load(out / "train.npy"), np.load(out / "heldout.npy")
    demo = demo_module()
    sizes = replace(demo.FULL, vocab=vocab)
    if steps:
        sizes = replace(sizes, teacher_steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher_dir, train, val = demo.make_teacher(sizes, seed, out)
    seconds = time.perf_counter() - t0
    np.save(out / "train.npy", train)
    np.save(out / "heldout.npy", val)
    held = demo.heldout_loss(_load(teacher_dir), val)
    readme.write_text(
        "The kdcache demo teacher at a larger vocabulary, for bench/storage.py.\n"
        "Made by bench/_demo_teacher.py:ensure_teacher, i.e. examples/demo.py's make_teacher\n"
        f"with Sizes(vocab={vocab}) (teacher_steps={sizes.teacher_steps}; FULL has "
        f"{demo.FULL.teacher_steps}), seed {seed}.\n"
        f"teacher/: tokenizer + LlamaForCausalLM; train.npy {train.shape} int32; "
        f"heldout.npy {val.shape} int32.\n"
        f"training took {seconds:.0f} s; held-out next-token loss {held:.3f} nats/token.\n"
        f"sizes: {json.dumps(asdict(sizes))}\n"
    )
    return teacher_dir, train, val


def _load(teacher_dir: Path) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
