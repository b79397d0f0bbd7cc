"""Knowledge-distillation losses against a kdcache teacher cache.

``kd_loss`` distils from the cached top-k of a teacher: log-probabilities at temperature 1 of its
top-k tokens plus the exact log-normaliser over the full vocabulary for each cached temperature.
With those, the teacher's probabilities at a cached temperature ``t`` are exact on the cached
support, ``log q_t(v) = (logprob_v + lse_1) / t - lse_t``, and so is the mass of the rest of the
vocabulary. Three ways to use that support (``tail``):

- ``"bucket"`` (default): compare k + 1 classes, the top-k plus one merged "rest of the vocabulary"
  class, for teacher and student. Unbiased targets; needs a cached temperature.
- ``"renormalize"``: renormalise both teacher and student over the k cached ids (what most top-k
  KD code does). Works at any temperature, but biases the target.
- ``"ignore"``: exact teacher and student probabilities, summed over the top-k only.

Every loss is ``t**2 * divergence`` averaged over positions (Hinton's convention), for
``divergence`` in ``"forward_kl"`` (KL(teacher || student)), ``"reverse_kl"`` and ``"jsd"``. With
k = V every tail mode equals :func:`dense_kd_loss` on the full teacher logits.

The teacher side is a constant target: it is detached, never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.client._divergences import (
    DIVERGENCES,
    divergence_terms,
    log1mexp,
    masked_mean,
    require_choice,
)
from kdcache.client._sampled import TARGETS, exact_topk_terms, resolve_targets, sampled_kd_loss
from kdcache.client.layermap import LayerMap
from kdcache.client.layerselect import LayerChoice, LearnedLayerMap
from kdcache.core.errors import TemperatureNotCachedError

__all__ = [
    "DIVERGENCES",
    "ENSEMBLES",
    "HIDDEN_KINDS",
    "TAILS",
    "TARGETS",
    "Projections",
    "dense_kd_loss",
    "hidden_loss",
    "hidden_losses",
    "kd_loss",
]

TAILS: tuple[str, ...] = ("bucket", "renormalize", "ignore")
ENSEMBLES: tuple[str, ...] = ("mixture", "sum")
HIDDEN_KINDS: tuple[str, ...] = ("mse", "cosine")

_TEMPERATURE_TOLERANCE = 1e-6


class Projections(Protocol):
    """Anything that gives the projection of a student layer: a HiddenProjector, a dict."""

    def __getitem__(self, layer: int, /) -> nn.Module: ...


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are upcast)."""
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {t.dtype}")
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    return t


def _get(batch: Mapping[str, Any], key: str) -> Any:
    """``batch[key]`` with a KeyError that lists the keys the batch does have."""
    try:
        return batch[key]
    except KeyError:
        raise KeyError(f"batch has no {key!r}; its keys are {sorted(batch)}") from None


def _default_mask(batch: Mapping[str, Any], mask: Tensor | None) -> Tensor | None:
    """An explicit mask wins; else the batch's ``loss_mask`` (B, T), if it has one."""
    if mask is not None:
        return mask
    found = batch.get("loss_mask")
    return None if found is None else torch.as_tensor(found)


def _cached_temperatures(batch: Mapping[str, Any], n_temps: int) -> tuple[float, ...]:
    """The temperatures of the last axis of ``topk_logsumexp``, from ``batch["temperatures"]``.

    Accepts a 1-D tensor (n_temps,), a collated 2-D tensor (B, n_temps) (row 0 is used), a list or
    tuple of floats, or a list of per-temperature tensors (B,) as default collation makes from a
    list. Without the key, a single cached temperature can only be 1.0, the one always cached.
    """
    if "temperatures" not in batch:
        if n_temps == 1:
            return (1.0,)
        raise KeyError(
            f"batch has {n_temps} cached temperatures in 'topk_logsumexp' but no 'temperatures' "
            f"to say which is which; its keys are {sorted(batch)}"
        )
    raw = batch["temperatures"]
    if isinstance(raw, Tensor):
        values = raw[0] if raw.dim() == 2 else raw.reshape(-1)
        floats = [float(v) for v in values.tolist()]
    elif isinstance(raw, (list, tuple)):
        floats = [float(torch.as_tensor(v).reshape(-1)[0]) for v in raw]
    else:
        floats = [float(raw)]
    # float32 storage turns 0.7 into 0.69999998...; the matching tolerance is 1e-6 anyway.
    temps = tuple(round(x, 6) for x in floats)
    if len(temps) != n_temps:
        raise ValueError(
            f"batch['temperatures'] lists {len(temps)} temperatures {list(temps)} but "
            f"'topk_logsumexp' has {n_temps} on its last axis"
        )
    return temps


def _temperature_index(temps: tuple[float, ...], t: float) -> int:
    for i, cached in enumerate(temps):
        if abs(cached - t) <= _TEMPERATURE_TOLERANCE:
            return i
    raise TemperatureNotCachedError(
        f"temperature {t:g} is not cached; the cache holds temperatures {list(temps)}. "
        "Use one of them, or tail='renormalize', which works at any temperature."
    )


def _topk_inputs(student_logits: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Validate the student logits against the batch; return (logprobs, indices).

    student_logits: (B, T, V). Returns the teacher's ``topk_logprobs`` (B, T, k), detached, and
    ``topk_indices`` (B, T, k) int64.
    """
    if student_logits.dim() != 3:
        raise ValueError(
            f"student_logits must be (B, T, V); got shape {tuple(student_logits.shape)}"
        )
    logprobs = torch.as_tensor(_get(batch, "topk_logprobs")).detach()
    indices = torch.as_tensor(_get(batch, "topk_indices")).to(torch.int64)
    b, t, v = student_logits.shape
    if logprobs.dim() != 3 or tuple(logprobs.shape[:2]) != (b, t):
        raise ValueError(
            f"topk_logprobs has shape {tuple(logprobs.shape)}; expected (B, T, k) with "
            f"(B, T) = {(b, t)} of student_logits {tuple(student_logits.shape)}"
        )
    if indices.shape != logprobs.shape:
        raise ValueError(
            f"topk_indices has shape {tuple(indices.shape)}; expected that of topk_logprobs "
            f"{tuple(logprobs.shape)}"
        )
    k = logprobs.shape[-1]
    if k == 0 or k > v:
        raise ValueError(f"top-k of {k} does not fit student_logits {tuple(student_logits.shape)}")
    lo, hi = (int(x) for x in torch.aminmax(indices))
    if lo < 0 or hi >= v:
        raise ValueError(
            f"topk_indices hold ids in [{lo}, {hi}], outside the "
            f"student's vocabulary of {v} (student_logits {tuple(student_logits.shape)})"
        )
    return logprobs.to(student_logits.device), indices.to(student_logits.device)


def _teacher_topk(
    batch: Mapping[str, Any], logprobs: Tensor, t: float, dtype: torch.dtype
) -> Tensor:
    """Exact teacher log-probabilities at temperature ``t`` on its top-k: (B, T, k)."""
    lse = torch.as_tensor(_get(batch, "topk_logsumexp")).detach().to(logprobs.device, dtype)
    if lse.dim() != 3 or tuple(lse.shape[:2]) != tuple(logprobs.shape[:2]):
        raise ValueError(
            f"topk_logsumexp has shape {tuple(lse.shape)}; expected (B, T, n_temps) with "
            f"(B, T) = {tuple(logprobs.shape[:2])}"
        )
    temps = _cached_temperatures(batch, lse.shape[-1])
    i_t = _temperature_index(temps, t)
    logprobs = logprobs.to(dtype)
    try:
        i_1 = _temperature_index(temps, 1.0)
    except TemperatureNotCachedError:
        raise ValueError(
            f"the cached temperatures {list(temps)} lack 1.0, which every kdcache cache stores"
        ) from None
    if i_t == i_1:
        return logprobs
    return (logprobs + lse[..., i_1 : i_1 + 1]) / t - lse[..., i_t : i_t + 1]


def _student_tail(scaled: Tensor, indices: Tensor, log_z: Tensor) -> Tensor:
    """Student log-mass outside the top-k: (B, T, 1), ``-inf`` where nothing is left.

    scaled: (B, T, V) student logits over t; indices: (B, T, k); log_z: (B, T, 1) full
    log-normaliser. Uses a logsumexp over the non-top-k logits, never log(1 - sum).
    """
    rest = scaled.scatter(-1, indices, float("-inf"))
    empty = torch.isneginf(rest).all(dim=-1, keepdim=True)
    lse_rest = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return (lse_rest - log_z).masked_fill(empty, float("-inf"))


def kd_loss(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    mask: Tensor | None = None,
    targets: str | None = None,
    ensemble: str = "mixture",
) -> Tensor:
    """Top-k KD loss of a student against a cached teacher; a scalar tensor.

    student_logits: (B, T, V) any float dtype (computed in float64 if float64, else float32).
    batch: ``topk_logprobs`` (B, T, k) float, ``topk_indices`` (B, T, k) int,
    ``topk_logsumexp`` (B, T, n_temps) float and ``temperatures`` (see the module docstring;
    the last two are not needed for ``tail="renormalize"``).
    mask: (B, T) bool, positions to average over; None for the batch's ``loss_mask`` (what a
    cache marks trained), or all B * T when the batch has none.
    Returns ``temperature**2 * divergence(teacher_t, student_t)`` averaged over positions.
    targets: ``"topk"`` (default when the batch has top-k), ``"sample"`` (default otherwise) or
    ``"topk+sample"``: unbiased estimates from the cached draws, forward KL only
    (:mod:`kdcache.client._sampled`; ``tail`` does not apply).
    ensemble: for a batch of several teachers (``teacher_weights``, from
    ``CacheDataset([a, b, ...])``): ``"mixture"`` compares the student with the weighted mixture
    of the teachers on the union of their cached ids plus a merged tail; ``"sum"`` weighs the
    per-teacher losses (:mod:`kdcache.client._mixture`). Top-k targets only.

    Raises TemperatureNotCachedError (a ValueError) for an uncached temperature with
    ``tail="bucket"`` or ``"ignore"``; ValueError for unknown choices or mismatched shapes.
    """
    require_choice(divergence, DIVERGENCES, "divergence")
    require_choice(tail, TAILS, "tail")
    require_choice(ensemble, ENSEMBLES, "ensemble")
    t = _check_temperature(temperature)
    if "teacher_weights" in batch:
        from kdcache.client._mixture import mixture_kd_loss

        if targets not in (None, "topk"):
            raise ValueError(f"an ensemble batch takes targets='topk' only; got {targets!r}")
        return mixture_kd_loss(student_logits, batch, t, divergence, tail, mask, ensemble)
    targets = resolve_targets(batch, targets)
    if targets != "topk":
        return _sampled(student_logits, batch, t, divergence, _default_mask(batch, mask), targets)
    logprobs, indices = _topk_inputs(student_logits, batch)
    mask = _default_mask(batch, mask)
    dtype = _compute_dtype(student_logits)
    scaled = student_logits.to(dtype) / t
    student_topk = scaled.gather(-1, indices)

    if tail == "renormalize":
        # The lse terms are constant over the k entries, so they cancel in the renormalisation.
        log_q = torch.log_softmax(logprobs.to(dtype) / t, dim=-1)
        log_p = torch.log_softmax(student_topk, dim=-1)
        per_position = divergence_terms(log_q, log_p, divergence).sum(-1)
        return t**2 * masked_mean(per_position, mask)

    log_q = _teacher_topk(batch, logprobs, t, dtype)
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_p = student_topk - log_z
    if tail == "bucket":
        if indices.shape[-1] == scaled.shape[-1]:
            q_tail = torch.full_like(log_q[..., :1], float("-inf"))
        else:
            q_tail = log1mexp(torch.logsumexp(log_q, dim=-1, keepdim=True))
        log_q = torch.cat([log_q, q_tail], dim=-1)
        log_p = torch.cat([log_p, _student_tail(scaled, indices, log_z)], dim=-1)
    per_position = divergence_terms(log_q, log_p, divergence).sum(-1)
    return t**2 * masked_mean(per_position, mask)


def _sampled(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    t: float,
    divergence: str,
    mask: Tensor | None,
    targets: str,
) -> Tensor:
    if student_logits.dim() != 3:
        raise ValueError(
            f"student_logits must be (B, T, V); got shape {tuple(student_logits.shape)}"
        )

    def lse_index(b: Mapping[str, Any], n_temps: int, temp: float) -> tuple[int, int]:
        temps = _cached_temperatures(b, n_temps)
        return _temperature_index(temps, temp), _temperature_index(temps, 1.0)

    def exact_topk(
        logits: Tensor, b: Mapping[str, Any], temp: float, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        logprobs, indices = _topk_inputs(logits, b)
        scaled = logits.to(dtype) / temp
        log_p = scaled.gather(-1, indices) - torch.logsumexp(scaled, dim=-1, keepdim=True)
        return exact_topk_terms(_teacher_topk(b, logprobs, temp, dtype), log_p), indices

    return sampled_kd_loss(
        student_logits,
        batch,
        t,
        divergence,
        mask,
        hybrid=targets == "topk+sample",
        lse_index=lse_index,
        exact_topk=exact_topk,
    )


def dense_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    mask: Tensor | None = None,
) -> Tensor:
    """The same loss as :func:`kd_loss` from full teacher logits; a scalar tensor.

    student_logits, teacher_logits: (B, T, V), any float dtypes (computed in float64 if either is
    float64, else float32). The teacher is detached. mask: (B, T) bool or None.
    """
    require_choice(divergence, DIVERGENCES, "divergence")
    t = _check_temperature(temperature)
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must both be (B, T, V) of the same shape"
        )
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(teacher_logits.detach().to(dtype) / t, dim=-1)
    log_p = torch.log_softmax(student_logits.to(dtype) / t, dim=-1)
    per_position = divergence_terms(log_q, log_p, divergence).sum(-1)
    return t**2 * masked_mean(per_position, mask)


def hidden_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor | Mapping[int, Tensor],
    kind: str = "mse",
    projection: nn.Module | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Feature-matching loss between one student and one teacher hidden state; a scalar.

    student_hidden: (B, T, d_s) float. teacher_hidden: (B, T, d_t) any float dtype, bfloat16
    included (detached; compared in float64 if the student is float64, else float32).
    projection: a module mapping d_s -> d_t, applied to the student first; None when d_s = d_t.
    kind: ``"mse"``, the mean squared error over positions and features, or ``"cosine"``, the
    mean over positions of 1 - cos(student, teacher). mask: (B, T) bool or None.

    Learned layer selection: with a :class:`~kdcache.client.layerselect.LayerChoice` as
    ``projection``, ``teacher_hidden`` is ``{teacher layer: (B, T, d_t)}`` for its candidates and
    the loss is the choice's weighted mean of this loss over them.
    """
    require_choice(kind, HIDDEN_KINDS, "kind")
    if isinstance(projection, LayerChoice):
        return _chosen_hidden_loss(student_hidden, teacher_hidden, kind, projection, mask)
    if not isinstance(teacher_hidden, Tensor):
        raise TypeError(
            "teacher_hidden must be a (B, T, d) tensor; a {layer: tensor} mapping goes with a "
            "LayerChoice projection (learned layer selection)"
        )
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise ValueError(
            f"hidden states must be (B, T, d); got student {tuple(student_hidden.shape)} and "
            f"teacher {tuple(teacher_hidden.shape)}"
        )
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} differ in (B, T)"
        )
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if projection is None and d_s != d_t:
        raise ValueError(
            f"student width {d_s} differs from teacher width {d_t}; pass a projection "
            "(e.g. HiddenProjector) mapping one to the other"
        )
    projected = student_hidden if projection is None else projection(student_hidden)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(
            f"projected student hidden has shape {tuple(projected.shape)}; expected the "
            f"teacher's {tuple(teacher_hidden.shape)}"
        )
    dtype = _compute_dtype(projected)
    student = projected.to(dtype)
    teacher = teacher_hidden.detach().to(student.device, dtype)
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(dim=-1)
    else:
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return masked_mean(per_position, mask)


def _chosen_hidden_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor | Mapping[int, Tensor],
    kind: str,
    choice: LayerChoice,
    mask: Tensor | None,
) -> Tensor:
    """:func:`hidden_loss` against each candidate of a learned choice, weighted by it."""
    if not isinstance(teacher_hidden, Mapping):
        raise TypeError(
            "with a LayerChoice, teacher_hidden must map each candidate teacher layer "
            f"{list(choice.teacher_layers)} to its (B, T, d_t) hidden states"
        )
    missing = [t for t in choice.teacher_layers if t not in teacher_hidden]
    if missing:
        raise ValueError(
            f"teacher_hidden lacks candidate teacher layers {missing}; it has "
            f"{sorted(teacher_hidden)}"
        )
    if student_hidden.shape[-1:] != (choice.student_dim,):
        raise ValueError(
            f"student hidden width {student_hidden.shape[-1] if student_hidden.dim() else 0} "
            f"differs from the learned map's student_dim {choice.student_dim}"
        )
    for layer in choice.teacher_layers:
        width = teacher_hidden[layer].shape[-1]
        if width != choice.teacher_dim:
            raise ValueError(
                f"teacher layer {layer} has width {width}; the learned map projects to "
                f"teacher_dim {choice.teacher_dim}"
            )

    def pair_loss(layer: int, projection: nn.Module) -> Tensor:
        return hidden_loss(student_hidden, teacher_hidden[layer], kind, projection, mask)

    return choice.loss(pair_loss)


def hidden_losses(
    student_hidden_states: Sequence[Tensor],
    batch: Mapping[str, Any],
    layer_map: LayerMap | LearnedLayerMap,
    projector: Projections | None = None,
    kind: str = "mse",
    mask: Tensor | None = None,
) -> Tensor:
    """Mean of :func:`hidden_loss` over the student layers of a layer map; a scalar.

    student_hidden_states: the HF-style tuple of (B, T, d_s) tensors (index 0 = embeddings,
    i = after student block i). batch: holds ``hidden_<teacher layer>`` (B, T, d_t) for each
    teacher layer of the map. layer_map: a :class:`LayerMap` of (student, teacher) pairs, with
    ``projector`` indexable by student layer (e.g. HiddenProjector) or None; or a
    :class:`~kdcache.client.layerselect.LearnedLayerMap`, which holds its own projections
    (``projector`` stays None) and weighs every cached candidate layer by its learned choice.
    mask: (B, T) bool; None for the batch's ``loss_mask``, or all positions without one.
    """
    require_choice(kind, HIDDEN_KINDS, "kind")
    mask = _default_mask(batch, mask)
    targets: dict[int, tuple[Tensor | Mapping[int, Tensor], nn.Module | None]] = {}
    if isinstance(layer_map, LearnedLayerMap):
        if projector is not None:
            raise ValueError("a LearnedLayerMap holds its own projections; pass projector=None")
        candidates = {t: _get(batch, f"hidden_{t}") for t in layer_map.teacher_layers}
        targets = {s: (candidates, layer_map[s]) for s in layer_map.student_layers}
    elif not layer_map.pairs:
        raise ValueError("layer_map has no (student, teacher) pairs")
    n_states = len(student_hidden_states)
    bad = [s for s in layer_map.student_layers if s >= n_states]
    if bad:
        raise ValueError(
            f"layer_map has student layer {bad[0]} but the student returned {n_states} hidden "
            f"states (0..{n_states - 1})"
        )
    if isinstance(layer_map, LayerMap):
        for s, t in layer_map.pairs:
            projection = None if projector is None else projector[s]
            targets[s] = (_get(batch, f"hidden_{t}"), projection)
    terms = [
        hidden_loss(student_hidden_states[s], teacher, kind, projection=projection, mask=mask)
        for s, (teacher, projection) in targets.items()
    ]
    return torch.stack(terms).mean()
