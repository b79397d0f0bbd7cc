"""``examples/born_again.py`` at tiny size: generations cached by ``kdcache run``, then a student
of their ensemble; its table parses and each cache holds its own generation's predictions."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.client import MultiCache, TeacherCache

ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 384  # demo.TINY.vocab

pytestmark = pytest.mark.slow


def _number(table: str, label: str) -> float:
    m = re.search(rf"^\s*{re.escape(label)}\s+(-?[0-9]+\.[0-9]+)", table, re.MULTILINE)
    assert m is not None, f"no line {label!r} in:\n{table}"
    return float(m.group(1))


def test_born_again_tiny(tmp_path: Path) -> None:
    out = tmp_path / "ba"
    cmd = [sys.executable, str(ROOT / "examples" / "born_again.py"), "--tiny", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--generations", "1", "--steps", "8"],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("== results") :]
    losses = [_number(table, label) for label in ("generation 0", "generation 1")]
    losses += [_number(table, "ensemble student"), _number(table, "ensemble itself")]
    assert all(0 < x < math.log(TINY_VOCAB) for x in losses), losses

    # each generation's cache holds that generation's own predictions over the training rows
    from transformers import AutoModelForCausalLM

    tokens = torch.from_numpy(np.load(out / "train_tokens.npy")[:4]).long()
    caches = [TeacherCache(c) for c in sorted((out / "root" / "caches").iterdir())]
    assert len(caches) == 2
    matched: dict[str, list[int]] = {}
    for gen in ("gen0", "gen1"):
        model = AutoModelForCausalLM.from_pretrained(out / gen, dtype=torch.float32)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=tokens).logits, dim=-1)
        matched[gen] = []
        for i, cache in enumerate(caches):
            b = cache.batch(range(4), ["input_ids", "topk"])
            assert torch.equal(b["input_ids"], tokens)
            want = logprobs.gather(-1, b["topk_indices"])
            if torch.allclose(b["topk_logprobs"], want, atol=2e-2):
                matched[gen].append(i)
    assert sorted(matched["gen0"] + matched["gen1"]) == [0, 1], matched  # one cache each
    # the two generations differ, and read together they form an ensemble
    multi = MultiCache([c.source for c in caches])
    batch = multi.batch([0, 1], ["input_ids", "topk"])
    assert not torch.equal(batch["teacher0_topk_logprobs"], batch["teacher1_topk_logprobs"])
