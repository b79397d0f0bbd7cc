"""Loss masks: read from a cache's ``loss_mask`` array (or the default of older caches), yielded
by TeacherCache and CacheDataset, and used by the losses by default; every masked loss equals a
dense float64 reference computed on the masked positions only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_dataset_support import SEQ_LEN, copy_with_loss_mask
from test_losses import TAILS, K, logits, make_batch, ref_loss

from kdcache.client import CacheDataset, LayerMap, TeacherCache, losses

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def random_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    return mask


# ---- losses against dense float64 references on the masked positions -------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_uses_the_batch_loss_mask(divergence: str, tail: str) -> None:
    teacher, student = logits(1), logits(2)
    batch = make_batch(teacher, k=K)
    mask = random_mask(teacher.shape[:2], seed=3)
    batch["loss_mask"] = mask
    got = losses.kd_loss(student, batch, temperature=2.0, divergence=divergence, tail=tail)
    _, indices = (teacher - torch.logsumexp(teacher, -1, keepdim=True)).topk(K, dim=-1)
    want = ref_loss(
        student[mask][None], teacher[mask][None], indices[mask][None], 2.0, divergence, tail
    )
    unmasked = ref_loss(student, teacher, indices, 2.0, divergence, tail)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.isclose(got, unmasked, rtol=1e-4)  # the mask changed something


def test_explicit_mask_wins_over_the_batch_loss_mask() -> None:
    teacher, student = logits(4), logits(5)
    batch = make_batch(teacher, k=K)
    batch["loss_mask"] = random_mask(teacher.shape[:2], seed=6)
    explicit = random_mask(teacher.shape[:2], seed=7)
    got = losses.kd_loss(student, batch, temperature=1.0, mask=explicit)
    plain = {k: v for k, v in batch.items() if k != "loss_mask"}
    torch.testing.assert_close(got, losses.kd_loss(student, plain, 1.0, mask=explicit))
    assert not torch.isclose(got, losses.kd_loss(student, batch, 1.0))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_losses_mask_equals_float64_reference(kind: str) -> None:
    g = torch.Generator().manual_seed(8)
    b, t, d = 3, 6, 5
    student = [torch.randn(b, t, d, generator=g, dtype=torch.float64) for _ in range(3)]
    teacher = torch.randn(b, t, d, generator=g).to(torch.bfloat16)
    mask = random_mask((b, t), seed=9)
    s, q = student[2][mask], teacher.double()[mask]  # (M, d) each
    if kind == "mse":
        want = ((s - q) ** 2).mean()
    else:
        want = (1 - (s * q).sum(-1) / (s.norm(dim=-1) * q.norm(dim=-1))).mean()
    got = losses.hidden_loss(student[2], teacher, kind=kind, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    batch = {"hidden_4": teacher, "loss_mask": mask}
    by_default = losses.hidden_losses(student, batch, LayerMap({2: 4}), kind=kind)
    torch.testing.assert_close(by_default, want, rtol=1e-9, atol=1e-12)
    everything = torch.ones_like(mask)
    unmasked = losses.hidden_losses(student, batch, LayerMap({2: 4}), kind=kind, mask=everything)
    assert not torch.isclose(unmasked, want, rtol=1e-4)


# ---- reading masks from caches ---------------------------------------------------------------


def default_mask(n: int, t: int = SEQ_LEN) -> torch.Tensor:
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[:, -1] = False
    return mask


def test_cache_without_loss_mask_reads_the_default(cache_dir37: str) -> None:
    cache = TeacherCache(cache_dir37)
    rows = [0, 5, 36]
    assert "loss_mask" in cache.fields
    for fields in (["topk"], None, ["loss_mask"]):
        batch = cache.batch(rows, fields)
        assert batch["loss_mask"].dtype == torch.bool
        assert torch.equal(batch["loss_mask"], default_mask(3))
    assert "loss_mask" not in cache.batch(rows, ["input_ids"])
    ds = CacheDataset(cache_dir37, fields=["topk"], shuffle=False, seq_len=SEQ_LEN - 4)
    sample = next(iter(ds))
    assert torch.equal(sample["loss_mask"], torch.ones(SEQ_LEN - 4, dtype=torch.bool))
    full = next(iter(CacheDataset(cache_dir37, fields=["loss_mask"], shuffle=False)))
    assert set(full) == {"row", "loss_mask"}
    assert torch.equal(full["loss_mask"], default_mask(1)[0])


@pytest.fixture(scope="module")
def masked_cache(
    cache_dir37: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(11)
    mask = rng.random((37, SEQ_LEN)) < 0.5
    mask[:, -1] = False
    dest = tmp_path_factory.mktemp("masked") / "cache"
    return copy_with_loss_mask(cache_dir37, Path(dest), mask), mask


def test_stored_loss_mask_is_read_exactly(masked_cache: tuple[str, np.ndarray]) -> None:
    url, mask = masked_cache
    rows = [3, 0, 36, 17]
    batch = TeacherCache(url).batch(rows, ["topk", "input_ids"])
    assert torch.equal(batch["loss_mask"], torch.from_numpy(mask[rows]))
    for workers in (0, 2):
        ds = CacheDataset(url, fields=["input_ids", "topk"], shuffle=True, seed=1)
        seen = 0
        for b in ds.loader(5, num_workers=workers):
            assert torch.equal(b["loss_mask"], torch.from_numpy(mask[b["row"].numpy()]))
            seen += len(b["row"])
        assert seen >= 37
    cropped = CacheDataset(url, fields=["loss_mask"], shuffle=False, seq_len=9)
    for s in cropped:
        assert torch.equal(s["loss_mask"], torch.from_numpy(mask[int(s["row"]), :9]))


def test_kd_loss_on_a_cache_batch_masks_by_default(masked_cache: tuple[str, np.ndarray]) -> None:
    url, mask = masked_cache
    cache = TeacherCache(url)
    batch = cache.batch(list(range(6)), ["topk"])
    student = torch.randn(6, SEQ_LEN, cache.manifest.vocab_size, dtype=torch.float64)
    got = losses.kd_loss(student, batch, temperature=2.0)
    m = torch.from_numpy(mask[:6])
    picked = {
        k: (v[m][None] if v.dim() >= 2 and k != "temperatures" else v)
        for k, v in batch.items()
        if k not in ("row", "loss_mask")
    }
    want = losses.kd_loss(student[m][None], picked, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    everything = losses.kd_loss(student, batch, temperature=2.0, mask=torch.ones_like(m))
    assert not torch.isclose(got, everything, rtol=1e-4)
