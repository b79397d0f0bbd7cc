"""Which student layer learns from which cached teacher layer, and the projections between them.

Layers are Hugging Face ``hidden_states`` indices on both sides: 0 is the embeddings, i is the
output of block i. A :class:`LayerMap` pairs student layers with teacher layers; a
:class:`HiddenProjector` holds one learned linear map per student layer from the student's width
to the teacher's.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["HiddenProjector", "LayerMap"]


def _layer_index(value: Any, what: str) -> int:
    """``value`` as a layer index; ints and NumPy/torch integer scalars, never bools or floats."""
    try:
        index = operator.index(value)
    except TypeError:
        index = -1
    if isinstance(value, bool) or index < 0:
        raise ValueError(f"{what} must be a non-negative integer layer index; got {value!r}")
    return index


@dataclass(frozen=True, init=False)
class LayerMap:
    """An immutable set of (student layer, teacher layer) pairs, sorted by student layer.

    Built from a mapping ``{student: teacher}`` or a sequence of ``(student, teacher)`` pairs.
    Each student layer appears once; a teacher layer may serve several student layers.
    """

    pairs: tuple[tuple[int, int], ...]

    def __init__(self, pairs: Mapping[int, int] | Sequence[tuple[int, int]]) -> None:
        items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        normalised: list[tuple[int, int]] = []
        for item in items:
            if len(item) != 2:
                raise ValueError(f"a layer pair is (student, teacher); got {item!r}")
            s, t = item
            normalised.append((_layer_index(s, "student layer"), _layer_index(t, "teacher layer")))
        if not normalised:
            raise ValueError("a LayerMap needs at least one (student, teacher) pair")
        students = [s for s, _ in normalised]
        repeated = sorted({s for s in students if students.count(s) > 1})
        if repeated:
            raise ValueError(f"student layers {repeated} are mapped more than once")
        object.__setattr__(self, "pairs", tuple(sorted(normalised)))

    @property
    def student_layers(self) -> tuple[int, ...]:
        """Student layers, ascending."""
        return tuple(s for s, _ in self.pairs)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """Teacher layers, aligned with :attr:`student_layers` (may repeat)."""
        return tuple(t for _, t in self.pairs)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def to_dict(self) -> dict[str, int]:
        """The manifest's form: ``{str(student layer): teacher layer}``."""
        return {str(s): t for s, t in self.pairs}

    @classmethod
    def uniform(
        cls, student_layers: int, teacher_layers: int, include_embeddings: bool = False
    ) -> LayerMap:
        """Evenly spaced: student block i (1..S) <- teacher block round(i * L / S).

        The same rule as a job's ``hidden_layers: "uniform:S"`` (Python's ``round``), so the map
        matches the layers such a cache holds; S = 6, L = 12 gives teacher layers 2, 4, ..., 12.
        ``include_embeddings`` adds (0, 0).
        """
        for name, value in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        pairs = [
            (i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)
        ]
        if include_embeddings:
            pairs.insert(0, (0, 0))
        return cls(pairs)

    @classmethod
    def from_manifest(cls, manifest: Any) -> LayerMap:
        """The layer map a cache was written for.

        ``manifest``: a kdcache Manifest, or a dict, with ``layer_map`` (``{str(student):
        teacher}``, empty or absent for an explicit layer list) and ``hidden_layers``. Without a
        mapping the cached layers are paired with student layers 1, 2, ... in order, except that
        the embeddings (layer 0), when cached, pair with the student's embeddings.
        """
        layer_map = _field(manifest, "layer_map") or {}
        if layer_map:
            items = layer_map.items() if isinstance(layer_map, Mapping) else layer_map
            return cls(
                [
                    (_parse_int(s, "layer_map key"), _parse_int(t, "layer_map value"))
                    for s, t in items
                ]
            )
        hidden = list(_field(manifest, "hidden_layers") or [])
        if not hidden:
            raise ValueError("the manifest has no hidden layers, so there is nothing to map")
        pairs = [(0, 0)] if 0 in hidden else []
        pairs += [(i + 1, layer) for i, layer in enumerate(x for x in hidden if x != 0)]
        return cls(pairs)

    def check(self, cached_layers: Iterable[int]) -> None:
        """Raise ValueError unless every teacher layer of this map is among ``cached_layers``."""
        cached = sorted(set(cached_layers))
        missing = sorted(set(self.teacher_layers) - set(cached))
        if missing:
            raise ValueError(
                f"teacher layers {missing} of the layer map are not cached; the cache holds "
                f"hidden layers {cached}"
            )


def _field(manifest: Any, name: str) -> Any:
    if isinstance(manifest, Mapping):
        return manifest.get(name)
    return getattr(manifest, name, None)


def _parse_int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"manifest {what} {value!r} is not a layer index") from None


class HiddenProjector(nn.Module):
    """One learned projection per student layer of a layer map, student width -> teacher width.

    ``projector[s]`` is the module for student layer ``s``: an ``nn.Linear(student_dim,
    teacher_dim)``, or ``nn.Identity`` when the widths are equal (unless ``always``).
    """

    def __init__(
        self,
        layer_map: LayerMap,
        student_dim: int,
        teacher_dim: int,
        bias: bool = False,
        always: bool = False,
    ) -> None:
        super().__init__()
        self.layer_map = layer_map
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        linear = always or student_dim != teacher_dim
        self.projections = nn.ModuleDict(
            {
                str(s): nn.Linear(student_dim, teacher_dim, bias=bias) if linear else nn.Identity()
                for s in layer_map.student_layers
            }
        )

    def __getitem__(self, layer: int) -> nn.Module:
        key = str(layer)
        if key not in self.projections:
            raise KeyError(
                f"no projection for student layer {layer}; the layer map has student layers "
                f"{list(self.layer_map.student_layers)}"
            )
        return self.projections[key]

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and str(layer) in self.projections

    def forward(self, layer: int, hidden: Tensor) -> Tensor:
        """Project student hidden states (B, T, student_dim) of ``layer`` to (B, T, teacher_dim)."""
        out: Tensor = self[layer](hidden)
        return out
