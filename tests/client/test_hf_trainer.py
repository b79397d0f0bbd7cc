"""KDTrainer under ``torchrun --nproc_per_node 2`` (CPU, gloo) on a cache of 37 rows (odd): every
row once per epoch over both ranks, in the dataset's global order, with and without gradient
accumulation, the dataset built before or after the TrainingArguments; checkpoints resume mid-epoch
with exactly the rows the uninterrupted run trained next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_dataset_support import global_sequence, padded_order

from kdcache.client import CacheDataset

pytest.importorskip("accelerate")

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_hf_train.py"
REPO = HERE.parents[1]
BATCH, WORLD, ROWS = 4, 2, 37

pytestmark = [pytest.mark.slow, pytest.mark.integration]


Records = list[list[dict[str, Any]]]


def torchrun(cache: str, out: Path, *flags: str, timeout: float = 240) -> Records:
    """Run the script on two ranks; return each rank's records (one per micro-batch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), str(SCRIPT), "--cache", cache, "--out", str(out),
           "--batch", str(BATCH), *flags]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out.joinpath("stderr.txt").write_text(done.stderr)
    return [
        [json.loads(line) for line in (out / f"rows-rank{r}.jsonl").read_text().splitlines()]
        for r in range(WORLD)
    ]


def expected_order(cache: str, epochs: int) -> list[int]:
    """Both epochs' global order, each padded to whole global batches."""
    ds = CacheDataset(cache, fields=["input_ids"], shuffle=True, seed=3, rank=0,
                      world_size=WORLD, batch_size=BATCH)  # fmt: skip
    out: list[int] = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out += padded_order(ds).tolist()
    return out


def trained(records: list[list[dict[str, Any]]]) -> list[int]:
    return global_sequence([[r["rows"] for r in rank] for rank in records])


@pytest.fixture(scope="module")
def runs(cache_dir37: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Uninterrupted runs (checkpointing mid-epoch) and runs resumed from those checkpoints."""
    tmp = tmp_path_factory.mktemp("hf")
    plain = torchrun(cache_dir37, tmp / "plain", "--build", "before", "--dispatch", "false",
                     "--save-steps", "3")  # fmt: skip
    accum = torchrun(cache_dir37, tmp / "accum", "--build", "after", "--dispatch", "true",
                     "--accum", "2", "--save-steps", "2", "--hidden", "--alpha", "0.3")  # fmt: skip
    # checkpoint-6: one batch into epoch 1; checkpoint-2 (4 of 5 batches): the step left holds one
    resumed = torchrun(cache_dir37, tmp / "plain-resumed", "--build", "before",
                       "--resume", str(tmp / "plain" / "checkpoint-6"))  # fmt: skip
    accum_resumed = torchrun(cache_dir37, tmp / "accum-resumed", "--build", "after",
                             "--accum", "2", "--hidden", "--alpha", "0.3",
                             "--resume", str(tmp / "accum" / "checkpoint-2"))  # fmt: skip
    return {
        "tmp": tmp, "plain": plain, "accum": accum, "resumed": resumed,
        "accum_resumed": accum_resumed,
    }  # fmt: skip


@pytest.mark.parametrize("name", ["plain", "accum"])
def test_every_row_once_per_epoch_in_global_order(
    runs: dict[str, Any], cache_dir37: str, name: str
) -> None:
    records = runs[name]
    per_epoch = -(-ROWS // (BATCH * WORLD))  # 5 batches per rank
    assert [len(r) for r in records] == [2 * per_epoch] * WORLD
    got = trained(records)
    assert got == expected_order(cache_dir37, 2)
    g = BATCH * WORLD
    for epoch in range(2):
        counts = Counter(got[epoch * per_epoch * g : (epoch + 1) * per_epoch * g])
        assert set(counts) == set(range(ROWS))
        repeated = sum(c - 1 for c in counts.values())
        assert repeated == per_epoch * g - ROWS and 0 < repeated < g
    assert all(r["mask_ok"] for rank in records for r in rank)  # default mask of an old cache
    assert "repeating 3 of 37 rows" in (runs["tmp"] / name / "stderr.txt").read_text()


def test_gradient_accumulation_groups_batches_into_steps(runs: dict[str, Any]) -> None:
    # 5 batches per rank and epoch, accumulated by 2: steps of 2, 2 and 1 batches
    steps = [r["step"] for r in runs["accum"][0]]
    assert steps == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    assert [r["step"] for r in runs["plain"][0]] == list(range(10))


@pytest.mark.parametrize(("name", "factor"), [("plain", 0.97), ("accum", 1.0)])
def test_kd_loss_decreases(runs: dict[str, Any], name: str, factor: float) -> None:
    # the same rows in both epochs: the KD loss of the second epoch's batches is lower
    per_epoch = [
        np.mean([x["kd"] for rank in runs[name] for x in rank[e * 5 : (e + 1) * 5]])
        for e in range(2)
    ]
    assert per_epoch[1] < factor * per_epoch[0], per_epoch  # accum: 6 steps, mostly hidden loss


@pytest.mark.parametrize(
    ("name", "checkpoint", "batches", "epoch"), [("plain", 6, 6, 1), ("accum", 2, 4, 0)]
)
def test_resume_trains_the_rows_the_uninterrupted_run_trained_next(
    runs: dict[str, Any], name: str, checkpoint: int, batches: int, epoch: int
) -> None:
    """Rows and their grouping into optimiser steps, in order, on each rank."""
    full, resumed = runs[name], runs[f"{name}_resumed" if name == "accum" else "resumed"]
    for r in range(WORLD):
        assert [(x["step"], x["rows"]) for x in resumed[r]] == [
            (x["step"], x["rows"]) for x in full[r][batches:]
        ]
    folder = runs["tmp"] / name / f"checkpoint-{checkpoint}"
    state = json.loads((folder / "kdcache_dataset.json").read_text())
    assert (state["epoch"], state["consumed"]) == (epoch, (batches - 5 * epoch) * BATCH)


END_SCRIPT = """
import torch, torch.distributed as dist
from kdcache.client.hf import end_distributed
end_distributed()  # no group yet: nothing to do
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
model(torch.ones(4, 3)).sum().backward()
out = [torch.zeros(2)]
dist.all_gather(out, torch.ones(2))
del model, out
end_distributed()
print("initialized after:", dist.is_initialized())
"""


def test_end_distributed_destroys_the_default_group_and_needs_none() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", END_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialized after: False" in done.stdout
