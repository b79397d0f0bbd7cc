"""Learned layer selection: each student layer learns which cached teacher layer to match.

A :class:`LearnedLayerMap` is a layer map whose teacher side is learned in training, for when the
right pairing is not known (a student of another depth or architecture). Every student layer ``s``
gets a :class:`LayerChoice`: one logit per candidate teacher layer (all the cached ones), equal at
the start, and a learned projection per candidate (student width -> teacher width). Its loss is
the softmax-weighted mean of the per-candidate losses::

    L_s = sum_j w_sj * loss(P_sj(h_s), H_j),        w_s = softmax(logits_s / temperature)

The loss is linear in the weights, so their gradient, ``w_sj * (L_sj - L_s) / temperature``,
moves weight to the candidates the student layer matches best: the weights learn which teacher
layer the student layer can become. (Matching a mixed target ``sum_j w_sj H_j`` instead would let
the weights pick whatever mix is easiest to hit, not a layer.) Lowering the temperature
(:meth:`LearnedLayerMap.anneal`) sharpens the weights; :meth:`LearnedLayerMap.harden` fixes each
student layer to its best candidate, after which only that pair is computed. :meth:`weights` and
:meth:`selected` report the choice; :meth:`to_layer_map` and :meth:`to_projector` turn it into a
plain :class:`LayerMap` and :class:`HiddenProjector` (for a leaner cache or a fixed-map run).

Per-candidate projections cost ``S * L * d_s * d_t`` parameters for S student and L candidate
layers; ``shared_projection=True`` keeps one per student layer (``S * d_s * d_t``), at the price of
a projection that first fits the weighted mix of candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdcache.client.layermap import HiddenProjector, LayerMap, _layer_index

__all__ = ["LayerChoice", "LearnedLayerMap"]

PairLoss = Callable[[int, nn.Module], Tensor]


def _layers(values: Sequence[int], what: str) -> tuple[int, ...]:
    layers = tuple(_layer_index(v, what) for v in values)
    if not layers:
        raise ValueError(f"{what}s: give at least one")
    repeated = sorted({x for x in layers if layers.count(x) > 1})
    if repeated:
        raise ValueError(f"{what}s {repeated} are given more than once")
    return tuple(sorted(layers))


def _positive(value: float, what: str) -> float:
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{what} must be a positive finite number; got {value!r}")
    return x


class LayerChoice(nn.Module):
    """One student layer's learned choice among the candidate teacher layers.

    logits: (L,) learnable, zero (uniform weights) at the start. ``projection(t)``: the module
    mapping the student's hidden states (B, T, d_s) to candidate ``t``'s width d_t. The
    temperature and whether the choice is hardened are plain Python values (no dtype cast
    touches them) that the state dict keeps as extra state.
    """

    def __init__(
        self,
        teacher_layers: Sequence[int],
        student_dim: int,
        teacher_dim: int,
        shared_projection: bool = False,
        bias: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.teacher_layers = _layers(teacher_layers, "teacher layer")
        self.logits = nn.Parameter(torch.zeros(len(self.teacher_layers)))
        keys = ["shared"] if shared_projection else [str(t) for t in self.teacher_layers]
        self.projections = nn.ModuleDict(
            {k: nn.Linear(student_dim, teacher_dim, bias=bias) for k in keys}
        )
        self.shared_projection = shared_projection
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.temperature = _positive(temperature, "temperature")
        self.hard = False

    def get_extra_state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "hard": self.hard}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.temperature = _positive(state["temperature"], "temperature")
        self.hard = bool(state["hard"])

    def projection(self, teacher_layer: int) -> nn.Module:
        """The projection used against candidate ``teacher_layer``."""
        if teacher_layer not in self.teacher_layers:
            raise KeyError(
                f"teacher layer {teacher_layer} is not a candidate; the candidates are "
                f"{list(self.teacher_layers)}"
            )
        return self.projections["shared" if self.shared_projection else str(teacher_layer)]

    def weights(self) -> Tensor:
        """The candidates' weights (L,): softmax(logits / temperature), one-hot once hardened."""
        if self.hard:
            return nn.functional.one_hot(self.logits.argmax(), len(self.teacher_layers)).to(
                self.logits.dtype
            )
        return torch.softmax(self.logits / self.temperature, dim=0)

    def best(self) -> int:
        """The teacher layer of the largest weight."""
        return self.teacher_layers[int(self.logits.detach().argmax())]

    def loss(self, pair_loss: PairLoss) -> Tensor:
        """``sum_j w_j * pair_loss(t_j, projection(t_j))``; a scalar.

        Hardened, only the best pair is computed; the other parameters join the graph with a
        zero factor, so every parameter gets a gradient each step (as DDP expects).
        """
        if self.hard:
            best = self.best()
            unused = [p.sum() for p in self.parameters() if p is not self.logits]
            loss = pair_loss(best, self.projection(best))
            return loss + 0.0 * (self.logits.sum() + torch.stack(unused).sum())
        terms = torch.stack([pair_loss(t, self.projection(t)) for t in self.teacher_layers])
        return (self.weights().to(terms.dtype) * terms).sum()


class LearnedLayerMap(nn.Module):
    """A layer map whose teacher side is learned: a :class:`LayerChoice` per student layer.

    student_layers: the student's hidden-state indices to distil (HF ``hidden_states``: 0 =
    embeddings, i = after block i). teacher_layers: the candidates, cached teacher layers (the
    batch holds ``hidden_<t>`` for each). temperature: of the softmax over each student layer's
    logits; ``anneal_to`` and ``harden_at`` make :meth:`anneal` lower it geometrically to
    ``anneal_to`` over training and harden the choice at that fraction of training.
    ``layer_map[s]`` is student layer ``s``'s :class:`LayerChoice`.
    """

    def __init__(
        self,
        student_layers: Sequence[int],
        teacher_layers: Sequence[int],
        student_dim: int,
        teacher_dim: int,
        *,
        temperature: float = 1.0,
        anneal_to: float | None = None,
        harden_at: float | None = None,
        shared_projection: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.student_layers = _layers(student_layers, "student layer")
        self.teacher_layers = _layers(teacher_layers, "teacher layer")
        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"{name} must be a positive integer; got {dim!r}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.start_temperature = _positive(temperature, "temperature")
        self.anneal_to = None if anneal_to is None else _positive(anneal_to, "anneal_to")
        if harden_at is not None and not 0.0 <= harden_at <= 1.0:
            raise ValueError(f"harden_at must be a fraction of training in [0, 1]; got {harden_at}")
        self.harden_at = harden_at
        self.bias = bias
        self.choices = nn.ModuleDict(
            {
                str(s): LayerChoice(
                    self.teacher_layers,
                    student_dim,
                    teacher_dim,
                    shared_projection=shared_projection,
                    bias=bias,
                    temperature=temperature,
                )
                for s in self.student_layers
            }
        )

    @classmethod
    def for_cache(
        cls, manifest: Any, student_layers: Sequence[int], student_dim: int, **kwargs: Any
    ) -> LearnedLayerMap:
        """Candidates = every hidden layer the cache holds, at the width its batches carry.

        ``manifest``: a kdcache Manifest or a dict with ``hidden_layers`` and ``hidden_width``
        (R for a ``pca:R`` cache read as codes, else the hidden size) or ``hidden_size``.
        """

        def get(key: str) -> Any:
            if isinstance(manifest, Mapping):
                return manifest.get(key)
            return getattr(manifest, key, None)

        layers, width = get("hidden_layers"), get("hidden_width") or get("hidden_size")
        if not layers or not width:
            raise ValueError("the cache holds no hidden layers to choose from")
        return cls(student_layers, list(layers), student_dim, int(width), **kwargs)

    def __getitem__(self, student_layer: int) -> LayerChoice:
        key = str(student_layer)
        if key not in self.choices:
            raise KeyError(
                f"no learned choice for student layer {student_layer}; the map has student "
                f"layers {list(self.student_layers)}"
            )
        choice: LayerChoice = self.choices[key]  # type: ignore[assignment]
        return choice

    def __iter__(self) -> Iterator[tuple[int, LayerChoice]]:
        return iter((s, self[s]) for s in self.student_layers)

    def __len__(self) -> int:
        return len(self.student_layers)

    # ---- schedule -------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return self[self.student_layers[0]].temperature

    def set_temperature(self, temperature: float) -> None:
        value = _positive(temperature, "temperature")
        for _, choice in self:
            choice.temperature = value

    def harden(self) -> None:
        """Fix every student layer to its best candidate from now on (the logits stop learning)."""
        for _, choice in self:
            choice.hard = True

    @property
    def hardened(self) -> bool:
        return all(choice.hard for _, choice in self)

    def anneal(self, progress: float) -> None:
        """Apply the schedule at ``progress`` (0 = start of training, 1 = end): temperature
        ``start * (anneal_to / start) ** progress``, and harden from ``harden_at`` on."""
        p = min(max(float(progress), 0.0), 1.0)
        if self.anneal_to is not None:
            self.set_temperature(
                self.start_temperature * (self.anneal_to / self.start_temperature) ** p
            )
        if self.harden_at is not None and p >= self.harden_at and not self.hardened:
            self.harden()

    # ---- report ---------------------------------------------------------------------------
    def weights(self) -> dict[int, dict[int, float]]:
        """``{student layer: {teacher layer: weight}}``, each row summing to 1."""
        with torch.no_grad():
            return {
                s: dict(zip(self.teacher_layers, choice.weights().float().tolist(), strict=True))
                for s, choice in self
            }

    def selected(self) -> dict[int, int]:
        """``{student layer: teacher layer of the largest weight}``."""
        return {s: choice.best() for s, choice in self}

    def to_layer_map(self) -> LayerMap:
        """The plain :class:`LayerMap` of the current choice."""
        return LayerMap(self.selected())

    def to_projector(self) -> HiddenProjector:
        """A :class:`HiddenProjector` for :meth:`to_layer_map` holding copies of the chosen
        projections, to go on training with a fixed map."""
        layer_map = self.to_layer_map()
        projector = HiddenProjector(
            layer_map, self.student_dim, self.teacher_dim, bias=self.bias, always=True
        )
        for s, t in layer_map:
            projector[s].load_state_dict(self[s].projection(t).state_dict())
        logits = self[self.student_layers[0]].logits
        return projector.to(logits.device, logits.dtype)

    def extra_repr(self) -> str:
        return (
            f"student_layers={list(self.student_layers)}, "
            f"teacher_layers={list(self.teacher_layers)}, temperature={self.temperature:g}"
        )
