"""KD and hidden-state losses against dense float64 references computed from full logits."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from kdcache.client import losses
from kdcache.client.layermap import HiddenProjector, LayerMap
from kdcache.core.errors import KDCacheError, TemperatureNotCachedError

B, T, V, K = 2, 5, 11, 4
TEMPS = (1.0, 2.0, 4.0)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalize", "ignore")


def logits(seed: int, dtype: torch.dtype = torch.float64, scale: float = 2.0) -> Tensor:
    """(B, T, V) random logits, reproducible per seed."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)


def make_batch(teacher: Tensor, k: int, temps: tuple[float, ...] = TEMPS) -> dict[str, Any]:
    """What the cache reader yields for float64 teacher logits (B, T, V), top-k sorted desc."""
    lse = torch.stack([torch.logsumexp(teacher / t, dim=-1) for t in temps], dim=-1)
    logprobs = teacher - lse[..., temps.index(1.0)].unsqueeze(-1)
    values, indices = logprobs.topk(k, dim=-1, sorted=True)
    return {
        "topk_logprobs": values.float(),
        "topk_indices": indices,
        "topk_logsumexp": lse.float(),
        "temperatures": torch.tensor(temps),
    }


def ref_terms(q: Tensor, p: Tensor, divergence: str) -> Tensor:
    """Per-class divergence terms from probabilities (..., C), written independently."""
    if divergence == "forward_kl":
        return torch.xlogy(q, q) - torch.xlogy(q, p)
    if divergence == "reverse_kl":
        return torch.xlogy(p, p) - torch.xlogy(p, q)
    m = (p + q) / 2
    return 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)) + 0.5 * (
        torch.xlogy(p, p) - torch.xlogy(p, m)
    )


def ref_loss(
    student: Tensor, teacher: Tensor, indices: Tensor, t: float, divergence: str, tail: str
) -> Tensor:
    """t**2 * mean divergence in float64, by hand; tail="dense" uses the full vocabulary."""
    q = torch.softmax(teacher.double() / t, dim=-1)
    p = torch.softmax(student.double() / t, dim=-1)
    if tail == "dense":
        return t**2 * ref_terms(q, p, divergence).sum(-1).mean()
    qk, pk = q.gather(-1, indices), p.gather(-1, indices)
    rest = torch.ones_like(q).scatter(-1, indices, 0.0)
    if tail == "bucket":
        qk = torch.cat([qk, (q * rest).sum(-1, keepdim=True)], dim=-1)
        pk = torch.cat([pk, (p * rest).sum(-1, keepdim=True)], dim=-1)
    elif tail == "renormalize":
        qk, pk = qk / qk.sum(-1, keepdim=True), pk / pk.sum(-1, keepdim=True)
    return t**2 * ref_terms(qk, pk, divergence).sum(-1).mean()


def value_and_grad(loss_fn: Any, student: Tensor) -> tuple[Tensor, Tensor]:
    x = student.detach().clone().requires_grad_(True)
    loss = loss_fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_support_equals_dense(divergence: str, tail: str, t: float) -> None:
    teacher, student = logits(0), logits(1)
    batch = make_batch(teacher, k=V)
    got, got_grad = value_and_grad(
        lambda s: losses.kd_loss(s, batch, temperature=t, divergence=divergence, tail=tail), student
    )
    want, want_grad = value_and_grad(
        lambda s: ref_loss(s, teacher, batch["topk_indices"], t, divergence, "dense"), student
    )
    dense, dense_grad = value_and_grad(
        lambda s: losses.dense_kd_loss(s, teacher, t, divergence), student
    )
    assert want > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dense, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_support_float32_student_finite_and_close(divergence: str, tail: str) -> None:
    teacher = logits(2)
    batch = make_batch(teacher, k=V)
    student = logits(3, torch.float32)
    got, grad = value_and_grad(
        lambda s: losses.kd_loss(s, batch, temperature=2.0, divergence=divergence, tail=tail),
        student,
    )
    want, want_grad = value_and_grad(
        lambda s: ref_loss(s, teacher, batch["topk_indices"], 2.0, divergence, "dense"), student
    )
    assert got.dtype == torch.float32
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_partial_support_matches_hand_computation(divergence: str, tail: str, t: float) -> None:
    teacher, student = logits(4), logits(5)
    batch = make_batch(teacher, k=K)
    got, got_grad = value_and_grad(
        lambda s: losses.kd_loss(s, batch, temperature=t, divergence=divergence, tail=tail), student
    )
    want, want_grad = value_and_grad(
        lambda s: ref_loss(s, teacher, batch["topk_indices"], t, divergence, tail), student
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    others = [m for m in TAILS if m != tail]
    for other in others:  # the modes really differ at k < V, so the checks above discriminate
        wrong = ref_loss(student, teacher, batch["topk_indices"], t, divergence, other)
        assert not torch.allclose(got, wrong, rtol=1e-3)


def test_divergences_differ_so_direction_is_checked() -> None:
    teacher, student = logits(6), logits(7)
    batch = make_batch(teacher, k=K)
    values = [losses.kd_loss(student, batch, divergence=d) for d in DIVERGENCES]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.allclose(values[i], values[j], rtol=1e-3)


@pytest.mark.parametrize("tail", TAILS)
def test_temperature_squared_scaling(tail: str) -> None:
    teacher, student = logits(8), logits(9)
    batch = make_batch(teacher, k=K)
    got = losses.kd_loss(student, batch, temperature=4.0, tail=tail)
    unscaled = ref_loss(student, teacher, batch["topk_indices"], 4.0, "forward_kl", tail) / 16.0
    torch.testing.assert_close(got, 16.0 * unscaled, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, unscaled, rtol=0.5)


@pytest.mark.parametrize("tail", TAILS)
def test_mask_averages_over_masked_positions_only(tail: str) -> None:
    teacher, student = logits(10), logits(11)
    batch = make_batch(teacher, k=K)
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    got = losses.kd_loss(student, batch, temperature=2.0, divergence="jsd", tail=tail, mask=mask)
    gathered = {
        key: value[mask].unsqueeze(0) for key, value in batch.items() if key != "temperatures"
    }
    gathered["temperatures"] = batch["temperatures"]
    want = losses.kd_loss(
        student[mask].unsqueeze(0), gathered, temperature=2.0, divergence="jsd", tail=tail
    )
    unmasked = losses.kd_loss(student, batch, temperature=2.0, divergence="jsd", tail=tail)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, unmasked, rtol=1e-3)


def test_dense_kd_loss_mask() -> None:
    teacher, student = logits(12), logits(13)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    got = losses.dense_kd_loss(student, teacher, 2.0, "reverse_kl", mask=mask)
    want = ref_loss(
        student[mask][None], teacher[mask][None], torch.empty(0), 2.0, "reverse_kl", "dense"
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tail", ["bucket", "ignore"])
def test_uncached_temperature_names_cached_ones(tail: str) -> None:
    batch = make_batch(logits(14), k=K, temps=(1.0, 2.0))
    with pytest.raises(TemperatureNotCachedError) as info:
        losses.kd_loss(logits(15), batch, temperature=3.0, tail=tail)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KDCacheError)
    assert "1.0" in str(info.value) and "2.0" in str(info.value) and "3" in str(info.value)


def test_renormalize_works_at_any_temperature() -> None:
    teacher, student = logits(16), logits(17)
    batch = make_batch(teacher, k=K, temps=(1.0,))
    got = losses.kd_loss(student, batch, temperature=3.0, tail="renormalize")
    want = ref_loss(student, teacher, batch["topk_indices"], 3.0, "forward_kl", "renormalize")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "form",
    [
        lambda temps: torch.tensor(temps),
        lambda temps: torch.tensor([temps] * B),
        lambda temps: list(temps),
        lambda temps: tuple(temps),
        lambda temps: [torch.full((B,), x) for x in temps],
    ],
    ids=["1d", "collated-2d", "list", "tuple", "collated-list"],
)
def test_temperatures_forms_and_order(form: Any) -> None:
    teacher, student = logits(18), logits(19)
    temps = (4.0, 1.0, 2.0)  # t=1 not first: the normaliser is picked by value, not position
    batch = make_batch(teacher, k=K, temps=temps)
    batch["temperatures"] = form(temps)
    for t in temps:
        got = losses.kd_loss(student, batch, temperature=t)
        want = ref_loss(student, teacher, batch["topk_indices"], t, "forward_kl", "bucket")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_single_temperature_without_temperatures_key_is_t1() -> None:
    teacher, student = logits(20), logits(21)
    batch = make_batch(teacher, k=K, temps=(1.0,))
    del batch["temperatures"]
    got = losses.kd_loss(student, batch)
    want = ref_loss(student, teacher, batch["topk_indices"], 1.0, "forward_kl", "bucket")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(TemperatureNotCachedError):
        losses.kd_loss(student, batch, temperature=2.0)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_tail_underflow_gives_finite_gradients(divergence: str, tail: str) -> None:
    teacher = torch.full((B, T, V), -200.0, dtype=torch.float64)
    teacher[..., :K] = torch.linspace(0.0, -1.0, K, dtype=torch.float64)  # tail mass ~1e-87
    batch = make_batch(teacher, k=K)
    student = logits(22, torch.float32)
    for t in TEMPS:
        loss, grad = value_and_grad(
            lambda s, t=t: losses.kd_loss(s, batch, t, divergence, tail), student
        )
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        if tail != "ignore":  # partial sums over the top-k may be negative
            assert loss > 0
        if (divergence, tail) != ("reverse_kl", "bucket"):  # a zero-mass teacher class is floored
            want = ref_loss(student, teacher, batch["topk_indices"], t, divergence, tail)
            torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_ids_are_exact_zeros(divergence: str, tail: str) -> None:
    """-inf logits (padded vocabulary) on both sides: the loss is that of the smaller vocabulary."""
    teacher, student = logits(34), logits(35)
    teacher[..., -2:] = float("-inf")
    student[..., -2:] = float("-inf")
    padded = make_batch(teacher, k=K)
    small = make_batch(teacher[..., :-2], k=K)
    loss, grad = value_and_grad(lambda s: losses.kd_loss(s, padded, 2.0, divergence, tail), student)
    want, want_grad = value_and_grad(
        lambda s: losses.kd_loss(s, small, 2.0, divergence, tail), student[..., :-2]
    )
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[..., :-2], want_grad, rtol=1e-12, atol=1e-12)
    assert (grad[..., -2:] == 0).all()
    dense, dense_grad = value_and_grad(
        lambda s: losses.dense_kd_loss(s, teacher, 2.0, divergence), student
    )
    assert torch.isfinite(dense) and torch.isfinite(dense_grad).all()


def test_mask_without_true_positions_gives_zero() -> None:
    batch = make_batch(logits(36), k=K)
    student = logits(37).requires_grad_(True)
    loss = losses.kd_loss(student, batch, mask=torch.zeros(B, T, dtype=torch.bool))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, student)
    assert (grad == 0).all()


def test_fp16_rounded_cache_values_stay_close() -> None:
    teacher, student = logits(23), logits(24)
    batch = make_batch(teacher, k=K)
    batch["topk_logprobs"] = batch["topk_logprobs"].half().float()
    for divergence in DIVERGENCES:
        got = losses.kd_loss(student, batch, 2.0, divergence)
        want = ref_loss(student, teacher, batch["topk_indices"], 2.0, divergence, "bucket")
        torch.testing.assert_close(got, want, rtol=5e-3, atol=1e-4)


def test_half_precision_student_is_computed_in_float32() -> None:
    teacher, student = logits(25), logits(26, torch.bfloat16)
    batch = make_batch(teacher, k=K)
    got = losses.kd_loss(student, batch, 2.0)
    assert got.dtype == torch.float32
    want = ref_loss(student.double(), teacher, batch["topk_indices"], 2.0, "forward_kl", "bucket")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"divergence": "kl"}, ["forward_kl", "reverse_kl", "jsd"]),
        ({"tail": "drop"}, ["bucket", "renormalize", "ignore"]),
    ],
)
def test_unknown_choices_name_the_valid_ones(kwargs: dict[str, str], names: list[str]) -> None:
    batch = make_batch(logits(27), k=K)
    with pytest.raises(ValueError) as info:
        losses.kd_loss(logits(28), batch, **kwargs)
    assert all(name in str(info.value) for name in names)


def test_shape_mismatches_name_the_shapes() -> None:
    batch = make_batch(logits(29), k=K)
    with pytest.raises(ValueError, match=r"\(2, 5, 4\).*\(2, 4, 11\)"):
        losses.kd_loss(logits(30)[:, :4], batch)
    with pytest.raises(ValueError, match="vocabulary of 8"):
        losses.kd_loss(logits(30)[..., :8], batch)  # ids up to 10 do not fit V = 8
    with pytest.raises(ValueError, match=r"\(2, 5, 11\).*\(2, 5, 8\)"):
        losses.dense_kd_loss(logits(30), logits(31)[..., :8])
    with pytest.raises(ValueError, match=r"mask has shape \(5, 2\)"):
        losses.kd_loss(logits(30), batch, mask=torch.ones(T, B, dtype=torch.bool))


def test_missing_batch_key_names_present_keys() -> None:
    batch = make_batch(logits(32), k=K)
    del batch["topk_logsumexp"]
    with pytest.raises(KeyError, match="topk_logsumexp.*topk_indices"):
        losses.kd_loss(logits(33), batch)


# Hidden-state losses


def hidden(seed: int, width: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, width, generator=g, dtype=torch.float64).to(dtype)


def ref_hidden(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    s, t = student.double(), teacher.double()
    if kind == "mse":
        return ((s - t) ** 2).mean()
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    return (1 - cos).mean()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_matches_reference(kind: str) -> None:
    student, teacher = hidden(0, 8), hidden(1, 8)
    got = losses.hidden_loss(student, teacher, kind=kind)
    torch.testing.assert_close(got, ref_hidden(student, teacher, kind), rtol=1e-12, atol=1e-12)
    other = "cosine" if kind == "mse" else "mse"
    assert not torch.allclose(got, ref_hidden(student, teacher, other), rtol=1e-3)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_bfloat16_teacher(kind: str) -> None:
    student, teacher = hidden(2, 8, torch.float32), hidden(3, 8, torch.bfloat16)
    got = losses.hidden_loss(student, teacher, kind=kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), ref_hidden(student, teacher, kind), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_projection_gets_gradients(kind: str) -> None:
    torch.manual_seed(0)
    proj = nn.Linear(6, 8, bias=True).double()
    student, teacher = hidden(4, 6), hidden(5, 8, torch.bfloat16)
    got = losses.hidden_loss(student, teacher, kind=kind, projection=proj)
    want = ref_hidden(student @ proj.weight.T + proj.bias, teacher, kind)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    assert proj.weight.grad.abs().sum() > 0


def test_hidden_loss_width_mismatch_names_widths() -> None:
    with pytest.raises(ValueError, match="6.*8"):
        losses.hidden_loss(hidden(6, 6), hidden(7, 8))


def test_hidden_loss_mask_and_kind() -> None:
    student, teacher = hidden(8, 8), hidden(9, 8)
    mask = torch.tensor([[True, True, False, False, False], [False, False, False, True, False]])
    for kind in ("mse", "cosine"):
        got = losses.hidden_loss(student, teacher, kind=kind, mask=mask)
        want = ref_hidden(student[mask], teacher[mask], kind)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="mse.*cosine"):
        losses.hidden_loss(student, teacher, kind="l1")


def test_hidden_losses_over_layer_map_with_projector() -> None:
    layer_map = LayerMap({1: 4, 2: 8})
    projector = HiddenProjector(layer_map, student_dim=6, teacher_dim=8).double()
    states = tuple(hidden(10 + i, 6) for i in range(3))
    batch = {"hidden_4": hidden(20, 8, torch.bfloat16), "hidden_8": hidden(21, 8, torch.bfloat16)}
    got = losses.hidden_losses(states, batch, layer_map, projector=projector, kind="cosine")
    want = 0.5 * (
        ref_hidden(projector[1](states[1]), batch["hidden_4"], "cosine")
        + ref_hidden(projector[2](states[2]), batch["hidden_8"], "cosine")
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    for layer in (1, 2):
        weight = projector[layer].weight
        assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_hidden_losses_without_projector_and_missing_key() -> None:
    layer_map = LayerMap([(2, 8)])
    states = tuple(hidden(30 + i, 8) for i in range(3))
    batch = {"hidden_8": hidden(40, 8)}
    got = losses.hidden_losses(states, batch, layer_map)
    torch.testing.assert_close(got, ref_hidden(states[2], batch["hidden_8"], "mse"))
    with pytest.raises(KeyError, match="hidden_4.*hidden_8"):
        losses.hidden_losses(states, batch, LayerMap({1: 4}))


def test_log_two_bound_of_jsd() -> None:
    """JSD never exceeds log 2 per position, even for disjoint supports."""
    teacher = torch.full((B, T, V), -1e4, dtype=torch.float64)
    teacher[..., 0] = 0.0
    student = torch.full((B, T, V), -1e4, dtype=torch.float64)
    student[..., 1] = 0.0
    batch = make_batch(teacher, k=V)
    got = losses.kd_loss(student, batch, divergence="jsd")
    torch.testing.assert_close(got, torch.tensor(math.log(2.0), dtype=torch.float64))
