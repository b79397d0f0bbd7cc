"""Learned layer selection: LearnedLayerMap / LayerChoice through hidden_loss and hidden_losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.client import CacheDataset, LayerMap, LearnedLayerMap, losses
from kdcache.client.layerselect import LayerChoice

B, T, D_T = 8, 32, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic(seed: int = 0) -> tuple[dict[str, Tensor], list[Tensor]]:
    """A batch of cached teacher layers 2, 4, 6, 8 and the student's hidden states.

    Student layer 1 is a fixed linear mix of teacher layer 4; student layer 2 one of teacher
    layer 8. Layer 6 is a near miss for student layer 2 (0.6 of layer 8 plus noise); layer 2 is
    unrelated noise. Student widths (12) exceed the teacher's (8), so the true layer is exactly
    reachable by a linear projection and no other is.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    z4, z8 = randn(B, T, D_T), randn(B, T, D_T)
    batch = {
        "hidden_2": randn(B, T, D_T),
        "hidden_4": z4,
        "hidden_6": 0.6 * z8 + 0.8 * randn(B, T, D_T),
        "hidden_8": z8,
    }
    states = [randn(B, T, 12), z4 @ randn(D_T, 12), z8 @ randn(D_T, 12)]
    return batch, states


def _train(layer_map: LearnedLayerMap, kind: str, steps: int = 150) -> list[float]:
    batch, states = _synthetic()
    opt = torch.optim.Adam(layer_map.parameters(), lr=0.05)
    seen = []
    for step in range(steps):
        layer_map.anneal(step / steps)
        loss = losses.hidden_losses(states, batch, layer_map, kind=kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(float(loss.detach()))
    return seen


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_recovers_the_teacher_layer_each_student_layer_is_made_from(kind: str) -> None:
    torch.manual_seed(0)
    layer_map = LearnedLayerMap([1, 2], [2, 4, 6, 8], student_dim=12, teacher_dim=D_T)
    start = layer_map.weights()
    assert all(w == pytest.approx(0.25) for row in start.values() for w in row.values())
    seen = _train(layer_map, kind)
    assert layer_map.selected() == {1: 4, 2: 8}
    weights = layer_map.weights()
    assert weights[1][4] > 0.9 and weights[2][8] > 0.9, weights
    assert weights[2][6] > weights[2][2]  # the near miss keeps more than the unrelated layer
    assert all(sum(row.values()) == pytest.approx(1.0) for row in weights.values())
    assert seen[-1] < 0.05 * seen[0], seen[::30]
    assert layer_map.to_layer_map() == LayerMap({1: 4, 2: 8})


def test_annealing_and_hardening_end_on_one_layer() -> None:
    torch.manual_seed(1)
    layer_map = LearnedLayerMap(
        [1, 2], [2, 4, 6, 8], 12, D_T, temperature=2.0, anneal_to=0.1, harden_at=0.75
    )
    layer_map.anneal(0.5)
    assert layer_map.temperature == pytest.approx(2.0 * (0.1 / 2.0) ** 0.5)
    assert not layer_map.hardened
    _train(layer_map, "mse")
    assert layer_map.hardened and layer_map.temperature == pytest.approx(2.0 * 0.05 ** (149 / 150))
    assert layer_map.weights() == {
        1: {2: 0.0, 4: 1.0, 6: 0.0, 8: 0.0},
        2: {2: 0.0, 4: 0.0, 6: 0.0, 8: 1.0},
    }
    # the state (temperature, hardened) travels in the state dict
    fresh = LearnedLayerMap([1, 2], [2, 4, 6, 8], 12, D_T, temperature=2.0)
    fresh.load_state_dict(layer_map.state_dict())
    assert fresh.hardened and fresh.temperature == pytest.approx(layer_map.temperature)
    assert fresh.selected() == {1: 4, 2: 8}


def test_shared_projection_recovers_the_layer_too() -> None:
    torch.manual_seed(2)
    layer_map = LearnedLayerMap([1, 2], [2, 4, 6, 8], 12, D_T, shared_projection=True)
    assert len(list(layer_map.parameters())) == 2 * 2  # a logit vector and one weight per layer
    _train(layer_map, "mse", steps=250)
    assert layer_map.selected() == {1: 4, 2: 8}, layer_map.weights()


def test_loss_and_gradient_against_a_float64_reference() -> None:
    torch.manual_seed(3)
    batch, states = _synthetic(seed=3)
    batch = {k: v.double() for k, v in batch.items()}
    h = states[1].double()
    choice = LayerChoice([2, 4, 6, 8], 12, D_T, temperature=0.7, bias=True).double()
    with torch.no_grad():
        choice.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.5]))
    teachers = {t: batch[f"hidden_{t}"] for t in (2, 4, 6, 8)}
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) > 0.3
    got = losses.hidden_loss(h, teachers, "cosine", projection=choice, mask=mask)

    per_layer = []
    for t in (2, 4, 6, 8):
        lin = choice.projection(t)
        proj = h @ lin.weight.T + lin.bias
        cos = (proj * teachers[t]).sum(-1) / (proj.norm(dim=-1) * teachers[t].norm(dim=-1))
        per_layer.append((1 - cos)[mask].mean())
    per = torch.stack(per_layer).detach()
    w = torch.softmax(choice.logits.detach() / 0.7, dim=0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach(), (w * per).sum(), rtol=1e-8, atol=1e-12)
    got.backward()
    # d/dlogit_j of sum_j w_j L_j = w_j (L_j - sum_i w_i L_i) / temperature
    expected = w * (per - (w * per).sum()) / 0.7
    assert choice.logits.grad is not None
    torch.testing.assert_close(choice.logits.grad, expected, rtol=1e-10, atol=1e-12)


def test_hardened_choice_computes_one_pair_and_gives_every_parameter_a_gradient() -> None:
    torch.manual_seed(4)
    batch, states = _synthetic()
    choice = LayerChoice([2, 4, 6, 8], 12, D_T)
    with torch.no_grad():
        choice.logits.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    choice.hard = True
    teachers = {t: batch[f"hidden_{t}"] for t in (2, 4, 6, 8)}
    got = losses.hidden_loss(states[2], teachers, "mse", projection=choice)
    only = F.mse_loss(choice.projection(8)(states[2]), batch["hidden_8"])
    torch.testing.assert_close(got, only)
    got.backward()
    grads = {name: p.grad for name, p in choice.named_parameters()}
    assert all(g is not None for g in grads.values()), grads.keys()
    assert float(grads["projections.8.weight"].abs().sum()) > 0  # type: ignore[union-attr]
    for name in ("logits", "projections.2.weight", "projections.4.weight"):
        assert float(grads[name].abs().sum()) == 0.0  # type: ignore[union-attr]


def test_to_projector_copies_the_chosen_projections() -> None:
    torch.manual_seed(5)
    layer_map = LearnedLayerMap([1, 3], [4, 8], 12, D_T, bias=True)
    with torch.no_grad():
        layer_map[1].logits.copy_(torch.tensor([2.0, 0.0]))
        layer_map[3].logits.copy_(torch.tensor([0.0, 2.0]))
    projector = layer_map.to_projector()
    assert projector.layer_map == LayerMap({1: 4, 3: 8})
    h = torch.randn(2, 3, 12)
    torch.testing.assert_close(projector(1, h), layer_map[1].projection(4)(h))
    torch.testing.assert_close(projector(3, h), layer_map[3].projection(8)(h))
    assert projector[1].weight.data_ptr() != layer_map[1].projection(4).weight.data_ptr()


def test_bad_input_is_named() -> None:
    batch, states = _synthetic()
    layer_map = LearnedLayerMap([1, 2], [2, 4, 6, 8], 12, D_T)
    with pytest.raises(ValueError, match="holds its own projections"):
        losses.hidden_losses(states, batch, layer_map, projector={1: torch.nn.Identity()})
    with pytest.raises(KeyError, match="hidden_6"):
        losses.hidden_losses(states, {k: v for k, v in batch.items() if k != "hidden_6"}, layer_map)
    with pytest.raises(ValueError, match="student layer 5"):
        losses.hidden_losses(states, batch, LearnedLayerMap([5], [2], 12, D_T))
    with pytest.raises(ValueError, match=r"lacks candidate teacher layers \[6, 8\]"):
        losses.hidden_loss(
            states[1], {2: batch["hidden_2"], 4: batch["hidden_4"]}, "mse", layer_map[1]
        )
    with pytest.raises(TypeError, match="map each candidate"):
        losses.hidden_loss(states[1], batch["hidden_4"], "mse", layer_map[1])
    with pytest.raises(TypeError, match="LayerChoice"):
        losses.hidden_loss(states[1], {4: batch["hidden_4"]}, "mse", torch.nn.Linear(12, D_T))
    with pytest.raises(KeyError, match=r"\[1, 2\]"):
        layer_map[3]
    with pytest.raises(KeyError, match="not a candidate"):
        layer_map[1].projection(5)
    for kwargs, match in [
        ({"temperature": 0.0}, "temperature"),
        ({"anneal_to": -1.0}, "anneal_to"),
        ({"harden_at": 1.5}, "harden_at"),
    ]:
        with pytest.raises(ValueError, match=match):
            LearnedLayerMap([1], [2], 12, D_T, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"teacher layers \[4\] are given more than once"):
        LearnedLayerMap([1], [4, 4], 12, D_T)
    with pytest.raises(ValueError, match="no hidden layers"):
        LearnedLayerMap.for_cache({"hidden_layers": [], "hidden_size": None}, [1], 12)
    from_cache = LearnedLayerMap.for_cache({"hidden_layers": [8, 4], "hidden_size": 16}, [1], 12)
    assert from_cache.teacher_layers == (4, 8) and from_cache.teacher_dim == 16
    pca = {"hidden_layers": [4], "hidden_size": 64, "hidden_width": 8}  # batches carry R codes
    assert LearnedLayerMap.for_cache(pca, [1], 12).teacher_dim == 8


def test_widths_that_do_not_fit_the_map_are_named() -> None:
    batch, states = _synthetic()
    layer_map = LearnedLayerMap([1], [2, 4], 12, D_T)
    narrow = [s[..., :10] for s in states]
    with pytest.raises(ValueError, match="student hidden width 10 .* student_dim 12"):
        losses.hidden_losses(narrow, batch, layer_map)
    wide = {**batch, "hidden_4": torch.cat([batch["hidden_4"], batch["hidden_4"]], dim=-1)}
    with pytest.raises(ValueError, match=f"teacher layer 4 has width {2 * D_T}.*{D_T}"):
        losses.hidden_losses(states, wide, layer_map)


def test_kdtrainer_anneals_hardens_and_logs_the_choice(cache_dir37: str, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from test_hf import student  # a 2-block Llama of width 16, seeded
    from transformers import TrainingArguments

    from kdcache.client.hf import KDConfig, KDTrainer

    ds = CacheDataset(cache_dir37, fields=["input_ids", "topk", "hidden_1", "hidden_2"], seed=0)
    learned = LearnedLayerMap.for_cache(ds.manifest, [1, 2], 16, anneal_to=0.1, harden_at=0.5)
    model = student(ds.manifest.vocab_size)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=6,
                             per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                             learning_rate=1e-2, disable_tqdm=True)  # fmt: skip
    kd = KDConfig(alpha=0.5, layer_map=learned, hidden_kind="cosine")
    trainer = KDTrainer(model=model, args=args, train_dataset=ds, kd=kd)
    assert model.kd_projector is learned
    before = learned[1].logits.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "hidden_loss" in h]
    assert len(logs) == 6
    for entry in logs:
        for s in (1, 2):
            assert entry[f"layer_{s}"] in (1, 2) and 0.5 <= entry[f"layer_{s}_weight"] <= 1.0
    assert learned.hardened and logs[-1]["layer_1_weight"] == 1.0
    assert logs[0]["layer_1_weight"] < 1.0
    assert not torch.equal(before, learned[1].logits.detach())  # learned before it was fixed
    assert learned.temperature == pytest.approx(0.1 ** (5 / 6))  # the last step's progress
