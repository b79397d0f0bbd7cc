"""Ensemble KD (issue 13): the mixture of several cached teachers vs dense float64 references."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from kdcache.client import losses
from kdcache.client.ensemble import teacher_view
from kdcache.core.errors import TemperatureNotCachedError

B, T, V = 2, 5, 13
TEMPS = (1.0, 2.0)
WEIGHTS = (0.5, 0.3, 0.2)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def logits(seed: int, scale: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)


def flat_tail_logits(seed: int, k: int) -> Tensor:
    """Logits whose V - k smallest are equal at every position (a flat tail), top ids random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((B, T, V), -1.0, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            ids = torch.randperm(V, generator=g)[:k]
            out[b, t, ids] = 3.0 * torch.rand(k, generator=g, dtype=torch.float64)
    return out


def single_batch(teacher: Tensor, k: int) -> dict[str, Any]:
    """One teacher's cached view of float64 logits (kept in float64 so references are tight)."""
    lse = torch.stack([torch.logsumexp(teacher / t, dim=-1) for t in TEMPS], dim=-1)
    values, indices = (teacher - lse[..., :1]).topk(k, dim=-1, sorted=True)
    return {
        "topk_logprobs": values,
        "topk_indices": indices,
        "topk_logsumexp": lse,
        "temperatures": torch.tensor(TEMPS),
    }


def ensemble_batch(
    teachers: list[Tensor], ks: list[int], weights: tuple[float, ...] = WEIGHTS
) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "teacher_weights": torch.tensor(weights, dtype=torch.float64).expand(B, -1)
    }
    for j, (z, k) in enumerate(zip(teachers, ks, strict=True)):
        batch.update({f"teacher{j}_{key}": v for key, v in single_batch(z, k).items()})
    return batch


def terms(q: Tensor, p: Tensor, divergence: str) -> Tensor:
    """Per-class divergence terms from probabilities, written independently of the library."""
    if divergence == "forward_kl":
        return torch.xlogy(q, q) - torch.xlogy(q, p)
    if divergence == "reverse_kl":
        return torch.xlogy(p, p) - torch.xlogy(p, q)
    m = (p + q) / 2
    return 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)) + 0.5 * (
        torch.xlogy(p, p) - torch.xlogy(p, m)
    )


def dense_mixture_loss(
    student: Tensor, teachers: list[Tensor], t: float, divergence: str, mask: Tensor | None = None
) -> Tensor:
    q = sum(w * torch.softmax(z / t, dim=-1) for w, z in zip(WEIGHTS, teachers, strict=True))
    p = torch.softmax(student / t, dim=-1)
    per = terms(q, p, divergence).sum(-1)
    return t**2 * (per.mean() if mask is None else per[mask].mean())


def union_loss(
    student: Tensor,
    teachers: list[Tensor],
    ks: list[int],
    t: float,
    divergence: str,
    tail: str = "bucket",
    estimate: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """The loss on "union of cached ids + one tail class", position by position in float64.

    estimate=True: a teacher's probability of an id it did not cache is its tail mass spread
    evenly over its uncached ids (the documented estimate); False: its true probability.
    """
    p_all = torch.softmax(student / t, dim=-1)
    per = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            tops = [
                set(z[b, i].topk(k).indices.tolist()) for z, k in zip(teachers, ks, strict=True)
            ]
            union = sorted(set().union(*tops))
            q_u = torch.zeros(len(union), dtype=torch.float64)
            for w, z, top, k in zip(WEIGHTS, teachers, tops, ks, strict=True):
                q = torch.softmax(z[b, i] / t, dim=-1)
                if tail == "renormalize":
                    cached = torch.tensor([q[v] if v in top else 0.0 for v in range(V)])
                    q = cached / cached.sum()
                elif estimate:
                    rest = 1 - sum(float(q[v]) for v in top)
                    q = torch.tensor([q[v] if v in top else rest / (V - k) for v in range(V)])
                q_u += w * q[union]
            p_u = p_all[b, i, union]
            if tail == "renormalize":
                p_u = p_u / p_u.sum()
            elif tail == "bucket":
                q_u = torch.cat([q_u, (1 - q_u.sum()).clamp(min=0).reshape(1)])
                p_u = torch.cat([p_u, (1 - p_u.sum()).reshape(1)])
            per[b, i] = terms(q_u, p_u, divergence).sum()
    return t**2 * (per.mean() if mask is None else per[mask].mean())


def value_and_grad(fn: Any, student: Tensor) -> tuple[Tensor, Tensor]:
    s = student.clone().requires_grad_(True)
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("tail", ["bucket", "ignore", "renormalize"])
def test_k_equals_v_is_the_dense_mixture_loss(divergence: str, t: float, tail: str) -> None:
    teachers = [logits(1), logits(2, scale=3.0), logits(3, scale=1.0)]
    batch = ensemble_batch(teachers, [V, V, V])
    student = logits(9)
    got, g_got = value_and_grad(
        lambda s: losses.kd_loss(s, batch, t, divergence, tail=tail), student
    )
    want, g_want = value_and_grad(lambda s: dense_mixture_loss(s, teachers, t, divergence), student)
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("t", TEMPS)
def test_flat_tails_give_the_exact_union_plus_tail_loss(divergence: str, t: float) -> None:
    """With flat teacher tails the estimate is exact: the reference uses true probabilities."""
    ks = [3, 4, 2]
    teachers = [flat_tail_logits(seed, k) for seed, k in zip((1, 2, 3), ks, strict=True)]
    batch = ensemble_batch(teachers, ks)
    student = logits(9)
    got, g_got = value_and_grad(lambda s: losses.kd_loss(s, batch, t, divergence), student)
    want, g_want = value_and_grad(
        lambda s: union_loss(s, teachers, ks, t, divergence, estimate=False), student
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "ignore", "renormalize"])
def test_k_below_v_is_the_union_plus_tail_loss(divergence: str, tail: str) -> None:
    ks = [4, 3, 5]
    teachers = [logits(4), logits(5, scale=3.0), logits(6)]
    batch = ensemble_batch(teachers, ks)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1:3] = False
    mask[1, -1] = False
    batch["loss_mask"] = mask
    student, t = logits(10), 2.0
    got, g_got = value_and_grad(
        lambda s: losses.kd_loss(s, batch, t, divergence, tail=tail), student
    )
    want, g_want = value_and_grad(
        lambda s: union_loss(s, teachers, ks, t, divergence, tail=tail, mask=mask), student
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert float(g_got[0, 1:3].abs().sum()) == 0.0  # masked positions get no gradient


def test_the_estimate_is_not_the_truth_for_peaked_tails() -> None:
    """The two references differ, so the tests above can tell the estimate from the truth."""
    ks = [2, 2, 2]
    teachers = [logits(4, scale=4.0), logits(5, scale=4.0), logits(6, scale=4.0)]
    student = logits(10)
    estimated = union_loss(student, teachers, ks, 1.0, "forward_kl")
    truth = union_loss(student, teachers, ks, 1.0, "forward_kl", estimate=False)
    got = losses.kd_loss(student, ensemble_batch(teachers, ks), 1.0)
    torch.testing.assert_close(got, estimated, rtol=1e-10, atol=1e-12)
    assert abs(float(estimated - truth)) > 1e-4


def test_identical_teachers_are_one_teacher() -> None:
    z = logits(7)
    batch = ensemble_batch([z, z, z], [4, 4, 4])
    student = logits(8)
    for divergence in DIVERGENCES:
        single = losses.kd_loss(student, single_batch(z, 4), 2.0, divergence)
        torch.testing.assert_close(
            losses.kd_loss(student, batch, 2.0, divergence), single, rtol=1e-10, atol=1e-12
        )


def test_sum_mode_weighs_the_per_teacher_losses() -> None:
    ks = [4, 3, 5]
    teachers = [logits(4), logits(5), logits(6)]
    batch = ensemble_batch(teachers, ks)
    student = logits(10)
    got = losses.kd_loss(student, batch, 2.0, "reverse_kl", ensemble="sum")
    want = sum(
        w * losses.kd_loss(student, single_batch(z, k), 2.0, "reverse_kl")
        for w, z, k in zip(WEIGHTS, teachers, ks, strict=True)
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert abs(float(got - losses.kd_loss(student, batch, 2.0, "reverse_kl"))) > 1e-6


def test_weights_are_normalised_and_zero_weight_drops_a_teacher() -> None:
    a, b = logits(1), logits(2)
    student = logits(3)
    doubled = ensemble_batch([a, b], [V, V], weights=(2.0, 0.0))
    torch.testing.assert_close(
        losses.kd_loss(student, doubled, 1.0),
        losses.dense_kd_loss(student, a, 1.0),
        rtol=1e-10,
        atol=1e-12,
    )


def _row(batch: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: v if k == "temperatures" else v[i : i + 1] for k, v in batch.items()}


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_a_zero_weight_teacher_adds_nothing_at_k_below_v(tail: str) -> None:
    """Its cached ids must not join the union: that would refine the classes compared (and, with
    renormalize, spread the student over ids no weighted teacher gives mass to)."""
    a, b, student = logits(1), logits(2), logits(3)
    single = single_batch(a, 4)
    dropped = ensemble_batch([a, b], [4, 5], weights=(1.0, 0.0))
    per_row = ensemble_batch([a, b], [4, 5], weights=(1.0, 0.0))
    per_row["teacher_weights"] = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    only_b = single_batch(b, 5)
    for divergence in DIVERGENCES:
        want = losses.kd_loss(student, single, 2.0, divergence, tail)
        got = losses.kd_loss(student, dropped, 2.0, divergence, tail)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        rows = [
            losses.kd_loss(student[i : i + 1], _row(one, i), 2.0, divergence, tail)
            for i, one in enumerate([single, only_b])
        ]
        got_rows = losses.kd_loss(student, per_row, 2.0, divergence, tail)
        torch.testing.assert_close(got_rows, (rows[0] + rows[1]) / 2, rtol=1e-10, atol=1e-12)


def test_teacher_view_gives_single_teacher_keys() -> None:
    teachers = [logits(1), logits(2)]
    batch = ensemble_batch(teachers, [3, 4], weights=(0.5, 0.5))
    batch["loss_mask"] = torch.ones(B, T, dtype=torch.bool)
    view = teacher_view(batch, 1)
    assert set(view) == {
        "topk_logprobs",
        "topk_indices",
        "topk_logsumexp",
        "temperatures",
        "loss_mask",
    }
    assert view["topk_indices"].shape == (B, T, 4)
    with pytest.raises(IndexError, match="teacher 2"):
        teacher_view(batch, 2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"teacher_weights": torch.tensor([1.0, -1.0])}, "teacher_weights must be finite, >= 0"),
        ({"teacher_weights": torch.tensor([0.0, 0.0])}, "not all 0"),
        ({"teacher_weights": torch.ones(B + 1, 2)}, "3 rows; the batch has 2"),
    ],
)
def test_bad_weights_are_refused(change: dict[str, Any], match: str) -> None:
    batch = ensemble_batch([logits(1), logits(2)], [3, 3], weights=(0.5, 0.5))
    batch.update(change)
    with pytest.raises(ValueError, match=match):
        losses.kd_loss(logits(3), batch)


def test_an_uncached_temperature_names_the_teachers_that_lack_it() -> None:
    batch = ensemble_batch([logits(1), logits(2), logits(4)], [3, 3, 3])
    batch["teacher1_topk_logsumexp"] = batch["teacher1_topk_logsumexp"][..., :1]
    batch["teacher1_temperatures"] = torch.tensor([1.0])
    for ensemble in ("mixture", "sum"):
        with pytest.raises(TemperatureNotCachedError) as err:
            losses.kd_loss(logits(3), batch, 2.0, ensemble=ensemble)
        assert "teacher 1 " in str(err.value) and "[1.0]" in str(err.value)
        assert "teacher 0" not in str(err.value) and "teacher 2" not in str(err.value)


def test_bad_choices_and_uncached_temperature_are_refused() -> None:
    batch = ensemble_batch([logits(1), logits(2)], [3, 3], weights=(0.5, 0.5))
    student = logits(3)
    with pytest.raises(ValueError, match="ensemble must be one of"):
        losses.kd_loss(student, batch, ensemble="average")
    with pytest.raises(ValueError, match="targets='topk' only"):
        losses.kd_loss(student, batch, targets="sample")
    with pytest.raises(ValueError, match="temperature 3 is not cached"):
        losses.kd_loss(student, batch, 3.0)
    del batch["teacher1_topk_indices"]
    with pytest.raises(KeyError, match="topk_indices"):
        losses.kd_loss(student, batch)
