#!/usr/bin/env python
"""Born-Again generations (Furlanello et al. 2018) with kdcache, then a student of the ensemble.

Generation 0 is a small Llama trained on hard labels (the demo's data: the Python docs). Each
later generation is a fresh model of the same size trained on hard labels plus top-k KD from the
previous generation's cache; that model is then saved and cached in its turn by an ordinary
``kdcache run`` (the CLI, called in this process), so it becomes the teacher of the next
generation. Last, a
fresh student distils from the ensemble of every generation's cache at once
(``MultiCache([...])``: the mixture of their distributions, :mod:`kdcache.client._mixture`).

Every model is scored by its held-out loss on the topics held out of training; so is the
ensemble itself (the mean of the generations' probabilities, which needs every model at once).

Usage: ``python examples/born_again.py [--out born-again-out] [--generations 3] [--tiny]``.
``--tiny`` shrinks everything (for the test); the numbers then mean little.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402  (the demo's data, model, training loop and `kdcache run` wrapper)

TEMPERATURE = 2.0


def write_job(sizes: demo.Sizes, teacher: Path, tokens: Path, job: Path) -> Path:
    """A job caching ``teacher``'s top-k at temperatures 1 and 2 over ``tokens``."""
    spec = {
        "name": f"born-again-{teacher.name}",
        "teacher": {"hf": str(teacher.absolute()), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens.absolute())},
        "outputs": {"topk": sizes.topk, "temperatures": [1.0, TEMPERATURE]},
        "batch_size": 16,
        "rows_per_shard": 256,
    }
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    return job


def save_generation(model: nn.Module, tokenizer_dir: Path, out: Path) -> Path:
    """Save a generation as a Hugging Face directory with generation 0's tokenizer files copied
    next to it byte for byte, so every cache records the same tokenizer fingerprint."""
    from kdcache.core.fingerprint import TOKENIZER_FILES

    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def kdcache_run(job: Path, root: Path) -> tuple[str, float]:
    """``kdcache run JOB --root ROOT`` in this process (the CLI's own entry point, so no second
    interpreter start-up per generation); (cache path, wall seconds)."""
    from kdcache.cli.main import main as kdcache

    print(f"$ kdcache run {job} --root {root}")
    t0 = time.perf_counter()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = kdcache(["run", str(job), "--root", str(root)])
    lines = stdout.getvalue().strip().splitlines()
    if code != 0 or not lines:
        sys.stderr.write(stdout.getvalue())
        raise SystemExit(f"kdcache run failed with exit code {code}")
    return lines[-1], time.perf_counter() - t0


@torch.inference_mode()
def ensemble_heldout_loss(models: Sequence[nn.Module], rows: np.ndarray, batch: int = 32) -> float:
    """Mean next-token CE (nats/token) of the mean of the models' probabilities over rows."""
    total, count = 0.0, 0
    for model in models:
        model.eval()
    for i in range(0, len(rows), batch):
        ids = torch.from_numpy(rows[i : i + batch]).long()
        logps = [torch.log_softmax(m(input_ids=ids).logits[:, :-1].double(), -1) for m in models]
        mixed = torch.logsumexp(torch.stack(logps), dim=0) - np.log(len(models))
        target = ids[:, 1:]
        total -= float(mixed.gather(-1, target[..., None]).sum())
        count += target.numel()
    return total / count


def cache_generation(sizes: demo.Sizes, model_dir: Path, tokens: Path, out: Path) -> str:
    job = write_job(sizes, model_dir, tokens, out / f"{model_dir.name}.yaml")
    path, wall = kdcache_run(job, out / "root")
    print(f"cached {model_dir.name} in {wall:.0f}s: {path}")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="born-again-out", help="work directory (wiped first)")
    p.add_argument("--generations", type=int, default=3, help="generations after the first")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override every model's training steps")
    args = p.parse_args(argv)
    if args.generations < 1:
        p.error("--generations must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = demo.TINY if args.tiny else demo.FULL
    if args.steps:
        sizes = replace(sizes, student_steps=args.steps)
    # every generation has the student's size; generation 0 is trained like the others
    sizes = replace(
        sizes,
        teacher_dim=sizes.student_dim,
        teacher_layers=sizes.student_layers,
        teacher_steps=sizes.student_steps,
        teacher_lr=sizes.student_lr,
        kd_temperature=TEMPERATURE,
    )
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM

    from kdcache.client import MultiCache, TeacherCache

    t_start = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    demo.header("generation 0: hard labels")
    gen0_dir, train, val = demo.make_teacher(sizes, args.seed, out / "gen0-work")
    gen_dirs = [gen0_dir.rename(out / "gen0")]
    tokens = out / "train_tokens.npy"
    np.save(tokens, train)
    caches = [cache_generation(sizes, gen_dirs[0], tokens, out)]
    order = demo.batches(len(train), sizes.batch, sizes.student_steps, args.seed + 2)
    held = [demo.heldout_loss(AutoModelForCausalLM.from_pretrained(gen_dirs[0]), val)]
    print(f"generation 0 held-out loss {held[0]:.3f}")

    for g in range(1, args.generations + 1):
        demo.header(f"generation {g}: hard labels + KD from generation {g - 1}'s cache")
        student = demo.train_student("kd", TeacherCache(caches[-1]), sizes, order, args.seed + g)
        held.append(demo.heldout_loss(student, val))
        print(f"generation {g} held-out loss {held[g]:.3f}")
        gen_dirs.append(save_generation(student, gen_dirs[0], out / f"gen{g}"))
        caches.append(cache_generation(sizes, gen_dirs[-1], tokens, out))

    demo.header(f"ensemble student: KD from the mixture of generations 0..{args.generations}")
    multi = MultiCache(caches)
    student = demo.train_student("kd", multi, sizes, order, args.seed + 100)
    held_student = demo.heldout_loss(student, val)
    models = [AutoModelForCausalLM.from_pretrained(d) for d in gen_dirs]
    held_ensemble = ensemble_heldout_loss(models, val)

    demo.header(f"results (seed {args.seed}, {time.perf_counter() - t_start:.0f}s in all)")
    size = f"Llama {sizes.student_layers} layers, d={sizes.student_dim}"
    steps = f"{sizes.student_steps} steps on the same batches"
    print(f"every model: {size}, {steps}; KD at t={TEMPERATURE} from the top-{sizes.topk}")
    print("held-out loss (nats/token, lower is better)")
    for g, loss in enumerate(held):
        label = "hard labels" if g == 0 else f"KD from generation {g - 1}"
        print(f"  {f'generation {g}':<22}{loss:.3f}  ({label})")
    n = args.generations
    print(f"  {'ensemble student':<22}{held_student:.3f}  (KD from generations 0..{n})")
    print(f"  {'ensemble itself':<22}{held_ensemble:.3f}  (mean of {n + 1} models' probabilities)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
