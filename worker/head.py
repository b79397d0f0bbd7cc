"""The teacher's LM head on its own, so logits can be made a chunk of positions at a time.

A fused teacher pass runs the model body to its last hidden state (B, T, d) and applies the LM
head over position chunks inside the extraction loop, so the (B, T, V) logits never exist; at a
152k vocabulary, T=4096 and B=8 that is 10 GB of bfloat16 logits not allocated.

:func:`hf_head` reads the head of a Hugging Face causal LM (``get_output_embeddings()``) and the
logit transforms its ``forward`` applies after the head that kdcache replicates: Gemma's
``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's ``logits_scaling``.
:func:`head_matches` checks a head against the model's own logits on a short probe, so a model
doing anything else after its head is run unfused instead of cached wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LMHead", "hf_head", "head_matches", "linear_head"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LMHead:
    """A linear LM head and the transforms after it: ``cap * tanh(scale * (h W^T + b) / cap)``.

    ``weight``: (V, d) in the model's dtype and device; ``bias``: (V,) or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, t, d) -> float32 logits (B, t, V) on the head's device.

        The product runs in the model's dtype, as the model's own head would, so the result
        equals the unfused logits' ``.float()``; the transforms then run in float32.
        ``out``: a float32 (rows, V) buffer on the head's device with rows >= B * t that a float32
        head writes its product into (the result is a view of it): a CPU pass reuses one buffer
        for every chunk instead of faulting in fresh pages of memory for each.
        """
        w = self.weight
        x = h.to(device=w.device, dtype=w.dtype)
        rows = x.shape[:-1].numel()
        if out is not None and w.dtype == torch.float32 and out.shape[0] >= rows:
            x2, o2 = x.reshape(rows, x.shape[-1]), out[:rows]
            if self.bias is None:
                torch.mm(x2, w.t(), out=o2)
            else:
                torch.addmm(self.bias, x2, w.t(), out=o2)
            z = o2.view(*x.shape[:-1], w.shape[0])
        else:
            z = F.linear(x, w, self.bias).float()
        # z is this call's own (a fresh product, or the caller's buffer): transform in place
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


def linear_head(module: Any, *, scale: float = 1.0, softcap: float | None = None) -> LMHead | None:
    """An :class:`LMHead` for a plain ``nn.Linear`` holding real floating-point weights, else None.

    Subclasses (quantised linears keep int8 weights behind ``nn.Linear``), weights on the
    ``meta`` device (offloaded by accelerate) and anything else fall back to the unfused path.
    """
    if type(module) is not nn.Linear:
        return None
    w = module.weight
    if w.dim() != 2 or not w.is_floating_point() or w.device.type == "meta":
        return None
    return LMHead(weight=w, bias=module.bias, scale=scale, softcap=softcap)


def _config_float(config: Any, name: str) -> float | None:
    for c in (config, getattr(config, "text_config", None)):
        v = getattr(c, name, None) if c is not None else None
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def hf_head(model: nn.Module) -> LMHead | None:
    """The LM head of a Hugging Face causal LM with its known logit transforms, or None."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    config = getattr(model, "config", None)
    scale = 1.0
    logit_scale = _config_float(config, "logit_scale")  # Cohere: logits * logit_scale
    if logit_scale is not None:
        scale *= logit_scale
    logits_scaling = _config_float(config, "logits_scaling")  # Granite: logits / logits_scaling
    if logits_scaling:
        scale /= logits_scaling
    softcap = _config_float(config, "final_logit_softcapping") or None  # Gemma 2 / 3
    return linear_head(get(), scale=scale, softcap=softcap)


def head_matches(
    head: LMHead,
    features: Callable[[torch.Tensor], torch.Tensor],
    logits: Callable[[torch.Tensor], torch.Tensor],
    probe: torch.Tensor,
    *,
    description: str,
) -> bool:
    """Whether ``head(features(probe))`` equals the model's own ``logits(probe)``.

    ``probe``: (1, t) int64 ids. The tolerance is the model dtype's rounding: 1e-4 of the
    largest logit in float32, 2e-2 in 16-bit types. A mismatch is logged and means "unfused".
    """
    try:
        with torch.inference_mode():
            h = features(probe)
            ref = logits(probe).double()
            got = head(h).double() if h.shape[-1] == head.in_features else None
    except Exception as err:  # any failure of the fused route means: use the model as it is
        log.info("%s: fused LM head unavailable (%s: %s)", description, type(err).__name__, err)
        return False
    if got is None or got.shape != ref.shape:
        log.info("%s: fused LM head unavailable: features do not fit the head", description)
        return False
    rel = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    tol = rel * max(1.0, float(ref.abs().max()))
    err_max = float((got.to(ref.device) - ref).abs().max())
    if err_max > tol:
        log.info(
            "%s: the model transforms its logits after the head (max difference %.3g), "
            "running it unfused",
            description,
            err_max,
        )
        return False
    return True
