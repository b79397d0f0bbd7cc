"""LayerMap construction and checks, and HiddenProjector."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdcache.client.layermap import HiddenProjector, LayerMap


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        (6, 12, (2, 4, 6, 8, 10, 12)),
        (4, 10, (2, 5, 8, 10)),  # round(2.5) = 2 and round(7.5) = 8: Python's round, as the job
        (3, 32, (11, 21, 32)),
        (12, 12, tuple(range(1, 13))),
    ],
)
def test_uniform(student: int, teacher: int, expected: tuple[int, ...]) -> None:
    layer_map = LayerMap.uniform(student, teacher)
    assert layer_map.student_layers == tuple(range(1, student + 1))
    assert layer_map.teacher_layers == expected


def test_uniform_with_embeddings_and_bad_sizes() -> None:
    assert LayerMap.uniform(2, 4, include_embeddings=True).pairs == ((0, 0), (1, 2), (2, 4))
    with pytest.raises(ValueError, match="student_layers"):
        LayerMap.uniform(0, 12)


def test_explicit_pairs_are_sorted_and_immutable() -> None:
    from_dict = LayerMap({3: 12, 1: 4, 2: 8})
    from_list = LayerMap([(2, 8), (3, 12), (1, 4)])
    assert from_dict.pairs == ((1, 4), (2, 8), (3, 12))
    assert from_dict == from_list and hash(from_dict) == hash(from_list)
    assert from_dict.student_layers == (1, 2, 3) and from_dict.teacher_layers == (4, 8, 12)
    assert list(from_dict) == [(1, 4), (2, 8), (3, 12)] and len(from_dict) == 3
    assert from_dict.to_dict() == {"1": 4, "2": 8, "3": 12}
    with pytest.raises(dataclasses.FrozenInstanceError):
        from_dict.pairs = ()


def test_teacher_layer_may_be_shared_but_student_layer_not() -> None:
    assert LayerMap([(1, 6), (2, 6)]).teacher_layers == (6, 6)
    with pytest.raises(ValueError, match=r"\[1\]"):
        LayerMap([(1, 4), (1, 8)])


@pytest.mark.parametrize("pairs", [[], [(1, -2)], [(1.0, 2)], [(True, 2)], [(1, 2, 3)]])
def test_invalid_pairs(pairs: list[tuple[object, ...]]) -> None:
    with pytest.raises(ValueError):
        LayerMap(pairs)


def test_from_manifest_with_mapping_dict_and_object() -> None:
    manifest = {"layer_map": {"2": 8, "1": 4}, "hidden_layers": [4, 8]}
    assert LayerMap.from_manifest(manifest).pairs == ((1, 4), (2, 8))
    obj = SimpleNamespace(layer_map={"1": 6, "2": 12}, hidden_layers=[6, 12])
    assert LayerMap.from_manifest(obj).pairs == ((1, 6), (2, 12))


def test_from_manifest_explicit_layer_list() -> None:
    assert LayerMap.from_manifest({"layer_map": {}, "hidden_layers": [4, 8]}).pairs == (
        (1, 4),
        (2, 8),
    )
    with_embeddings = SimpleNamespace(layer_map={}, hidden_layers=[0, 6, 12])
    assert LayerMap.from_manifest(with_embeddings).pairs == ((0, 0), (1, 6), (2, 12))
    with pytest.raises(ValueError, match="no hidden layers"):
        LayerMap.from_manifest({"layer_map": {}, "hidden_layers": []})


def test_check_names_missing_and_cached_layers() -> None:
    layer_map = LayerMap.uniform(3, 12)
    layer_map.check([4, 8, 12, 0])
    with pytest.raises(ValueError) as info:
        layer_map.check([4, 12])
    assert "[8]" in str(info.value) and "[4, 12]" in str(info.value)


def test_projector_linear_per_student_layer() -> None:
    projector = HiddenProjector(LayerMap({1: 4, 3: 8}), student_dim=6, teacher_dim=10, bias=True)
    for layer in (1, 3):
        module = projector[layer]
        assert isinstance(module, nn.Linear) and module.weight.shape == (10, 6)
        assert module.bias is not None
    assert projector[1] is not projector[3]
    assert 1 in projector and 2 not in projector
    assert len(list(projector.parameters())) == 4
    out = projector(3, torch.randn(2, 5, 6))
    assert out.shape == (2, 5, 10)
    with pytest.raises(KeyError, match=r"\[1, 3\]"):
        projector[2]


def test_projector_identity_when_widths_match_unless_always() -> None:
    layer_map = LayerMap({1: 2})
    assert isinstance(HiddenProjector(layer_map, 8, 8)[1], nn.Identity)
    always = HiddenProjector(layer_map, 8, 8, always=True)[1]
    assert isinstance(always, nn.Linear) and always.bias is None
