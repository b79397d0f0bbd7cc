"""Teachers: a loaded model that maps token ids to logits and the hidden states asked for.

Two sources, one :class:`Teacher` protocol:

- ``hf``: a local Hugging Face directory (``AutoModelForCausalLM``), see :class:`HFTeacher`;
- ``module``: ``"pkg.mod:callable"``, a zero-argument callable returning an ``nn.Module``,
  see :class:`ModuleTeacher` (an HF ``PreTrainedModel`` returned there is treated like ``hf``).

A teacher whose LM head is a plain linear layer is also a :class:`FusedTeacher`: its ``head`` is
not None and ``forward_features`` stops before the head, so extraction applies the head a chunk
of positions at a time (:mod:`kdcache.worker.head`) and the (B, T, V) logits never exist.

Hidden layers follow HF ``hidden_states`` indexing: 0 = the input of the first decoder block
(embeddings, plus positions / scaling where the model adds them), i = the output of decoder block i,
and ``num_layers`` = the input of the output embedding (after the final norm), which is what HF
returns last. :class:`HFTeacher` captures only the requested layers with hooks instead of
``output_hidden_states=True``, which would keep every layer's activation alive.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kdcache.core.errors import TeacherError
from kdcache.worker.head import LMHead, head_matches, hf_head, linear_head
from kdcache.worker.placement import placement, plan_device_map

__all__ = [
    "FeatureOutput",
    "FusedTeacher",
    "HFTeacher",
    "ModuleTeacher",
    "Teacher",
    "TeacherOutput",
    "load_teacher",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TeacherOutput:
    """One teacher forward.

    ``logits``: (B, T, V) in the model's dtype, on the teacher's device.
    ``hidden``: exactly the requested layers, each (B, T, d), HF ``hidden_states`` indexing.
    """

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class FeatureOutput:
    """One teacher forward that stops before the LM head.

    ``features``: (B, T, d), the input of the LM head (after the final norm), on the head's side.
    ``hidden``: exactly the requested layers, each (B, T, d), HF ``hidden_states`` indexing.
    """

    features: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Teacher(Protocol):
    """A model the worker runs once per row: ids (B, T) -> logits and selected hidden states."""

    vocab_size: int
    num_layers: int | None
    hidden_size: int | None
    max_positions: int | None
    dtype: torch.dtype
    device: torch.device
    description: str

    def forward(self, ids: torch.Tensor, layers: Sequence[int]) -> TeacherOutput:
        """Run ``ids`` (B, T) int64 on the teacher's device; capture ``layers`` only."""
        ...


@runtime_checkable
class FusedTeacher(Teacher, Protocol):
    """A teacher that can stop before its linear LM head (``head`` None: it cannot, this time)."""

    head: LMHead | None

    def forward_features(self, ids: torch.Tensor, layers: Sequence[int]) -> FeatureOutput:
        """Run ``ids`` (B, T) through the body only: the head's input + ``layers``."""
        ...


def _probe_ids(vocab_size: int, max_positions: int | None) -> torch.Tensor:
    """(1, t) ids for checking a fused head against the model: varied, inside the vocabulary."""
    t = min(8, max_positions or 8)
    return (torch.arange(t, dtype=torch.long).unsqueeze(0) * 7919 + 1) % max(1, vocab_size)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise TeacherError(f"bad teacher device {device!r}: {err}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise TeacherError(f"bad teacher dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _first_tensor(x: Any) -> torch.Tensor:
    """Decoder blocks return a tensor or a tuple whose element 0 is the hidden state."""
    return x[0] if isinstance(x, tuple | list) else x


def _find_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder-block list: the largest ``nn.ModuleList`` of exactly ``num_layers`` modules."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not lists:
        raise TeacherError(
            f"cannot find the {num_layers} decoder blocks of {type(model).__name__}: "
            "no nn.ModuleList of that length"
        )
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class HFTeacher:
    """A Hugging Face causal LM; hidden states captured with hooks, only those requested."""

    def __init__(self, model: nn.Module, *, description: str) -> None:
        self.model = model.eval()
        config = getattr(model, "config", None)
        out_emb = model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(out_emb, nn.Module):
            raise TeacherError(f"{description}: the model has no output embedding (lm_head)")
        self._lm_head: nn.Module = out_emb
        weight = getattr(out_emb, "weight", None)
        vocab = _config_int(config, "vocab_size")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            vocab = int(weight.shape[0])
        if vocab is None:
            raise TeacherError(f"{description}: cannot tell the vocabulary size")
        self.vocab_size: int = vocab
        self.num_layers: int | None = _config_int(config, "num_hidden_layers", "n_layer")
        self.hidden_size: int | None = _config_int(config, "hidden_size", "n_embd", "d_model")
        self.max_positions: int | None = _config_int(
            config, "max_position_embeddings", "n_positions"
        )
        param = next(model.parameters())
        self.dtype: torch.dtype = param.dtype
        self.device: torch.device = param.device
        self.description = description
        self._blocks: nn.ModuleList | None = None  # found on first use: logits need no blocks
        self.head: LMHead | None = self._fused_head()

    def _fused_head(self) -> LMHead | None:
        """The LM head to apply chunk-wise, if the model's own logits are exactly that head's."""
        head = hf_head(self.model)
        body = getattr(self.model, "base_model", self.model)
        if head is None or body is self.model:
            return None
        probe = _probe_ids(self.vocab_size, self.max_positions).to(self.device)
        ok = head_matches(
            head,
            lambda x: self._body(x),
            lambda x: self.model(input_ids=x, use_cache=False).logits,
            probe,
            description=self.description,
        )
        return head if ok else None

    def _body(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> the LM head's input (B, T, d): the base model's last hidden state."""
        body: Any = getattr(self.model, "base_model", self.model)
        out = body(input_ids=ids, use_cache=False)
        h = getattr(out, "last_hidden_state", None)
        return h if isinstance(h, torch.Tensor) else _first_tensor(out)

    def _decoder_blocks(self) -> nn.ModuleList:
        if self._blocks is None:
            self._blocks = _find_blocks(self.model, self.num_layers or 0)
        return self._blocks

    def _check_layers(self, layers: Sequence[int]) -> None:
        top = self.num_layers
        bad = [i for i in layers if top is None or not 0 <= i <= top]
        if bad:
            raise TeacherError(
                f"{self.description}: hidden layers {bad} out of range 0..{top}"
                if top is not None
                else f"{self.description}: the number of layers is unknown, cannot tap {bad}"
            )

    def _hooks(
        self, layers: Sequence[int], store: dict[int, torch.Tensor], *, head: bool = True
    ) -> list[Any]:
        """Register one hook per requested layer, writing (B, T, d) tensors into ``store``.

        ``head=False``: the LM head will not run, so the top layer is left to the caller.
        """
        top = self.num_layers
        if any(i != top for i in layers):
            self._decoder_blocks()  # raises before any hook is registered, so none leaks
        handles = []
        for i in sorted(set(layers)):
            if i == top and not head:
                continue
            if i == top:  # after the final norm: the input of lm_head

                def pre_head(_m: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
                    store[i] = args[0].detach().clone()

                handles.append(self._lm_head.register_forward_pre_hook(pre_head))
            elif i == 0:  # the first block's input includes position embeddings (GPT-2)

                def pre_block(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                    x = args[0] if args else kwargs["hidden_states"]
                    store[0] = x.detach().clone()

                block0 = self._decoder_blocks()[0]
                handles.append(block0.register_forward_pre_hook(pre_block, with_kwargs=True))
            else:

                def post_block(_m: nn.Module, _args: tuple[Any, ...], out: Any, i: int = i) -> None:
                    store[i] = _first_tensor(out).detach().clone()

                handles.append(self._decoder_blocks()[i - 1].register_forward_hook(post_block))
        return handles

    def forward(self, ids: torch.Tensor, layers: Sequence[int]) -> TeacherOutput:
        """ids: (B, T) int64 -> logits (B, T, V) in the model dtype + hidden (B, T, d) each."""
        self._check_layers(layers)
        store: dict[int, torch.Tensor] = {}
        handles = self._hooks(layers, store)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids.to(self.device, non_blocking=True), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return TeacherOutput(logits=out.logits, hidden={i: store[i] for i in layers})

    def forward_features(self, ids: torch.Tensor, layers: Sequence[int]) -> FeatureOutput:
        """ids: (B, T) int64 -> the LM head's input (B, T, d) + hidden (B, T, d) each."""
        self._check_layers(layers)
        store: dict[int, torch.Tensor] = {}
        handles = self._hooks(layers, store, head=False)
        try:
            with torch.inference_mode():
                h = self._body(ids.to(self.device, non_blocking=True))
        finally:
            for hd in handles:
                hd.remove()
        top = self.num_layers
        if top is not None and top in layers:
            store[top] = h  # after the final norm: exactly the head's input
        return FeatureOutput(features=h, hidden={i: store[i] for i in layers})


class ModuleTeacher:
    """A plain ``nn.Module``: ids (B, T) -> logits (B, T, V), or (logits, hidden_states).

    ``hidden_states`` is a sequence in HF indexing (0 = embeddings ... L = after the final norm).
    A module declares its head for the fused pass with two attributes: ``kdcache_head``, the
    ``nn.Linear`` that makes its logits, and ``kdcache_features(ids)``, returning the head's input
    (B, T, d), or (that, hidden_states). The declaration is checked once against ``forward``.
    """

    def __init__(self, module: nn.Module, *, description: str) -> None:
        self.module = module.eval()
        self.description = description
        param = next(module.parameters(), None)
        self.dtype: torch.dtype = param.dtype if param is not None else torch.float32
        self.device: torch.device = param.device if param is not None else torch.device("cpu")
        config = getattr(module, "config", None)
        self.num_layers: int | None = _config_int(module, "num_layers") or _config_int(
            config, "num_hidden_layers", "n_layer"
        )
        self.hidden_size: int | None = _config_int(module, "hidden_size") or _config_int(
            config, "hidden_size", "n_embd"
        )
        self.max_positions: int | None = _config_int(module, "max_positions") or _config_int(
            config, "max_position_embeddings", "n_positions"
        )
        vocab = _config_int(module, "vocab_size") or _config_int(config, "vocab_size")
        if vocab is None:  # probe: one tiny forward tells V
            logits, _ = self._run(torch.zeros((1, 2), dtype=torch.long))
            vocab = int(logits.shape[-1])
        self.vocab_size: int = vocab
        self.head: LMHead | None = self._declared_head()

    def _declared_head(self) -> LMHead | None:
        declared = getattr(self.module, "kdcache_head", None)
        if declared is None or not callable(getattr(self.module, "kdcache_features", None)):
            return None
        head = linear_head(declared)
        if head is None:
            log.info("%s: kdcache_head is not a plain nn.Linear, running unfused", self.description)
            return None
        probe = _probe_ids(self.vocab_size, self.max_positions).to(self.device)
        ok = head_matches(
            head,
            lambda x: self._features(x)[0],
            lambda x: self._run(x)[0],
            probe,
            description=self.description,
        )
        return head if ok else None

    def _features(self, ids: torch.Tensor) -> tuple[torch.Tensor, Sequence[torch.Tensor] | None]:
        with torch.inference_mode():
            out = getattr(self.module, "kdcache_features")(ids.to(self.device, non_blocking=True))  # noqa: B009
        if isinstance(out, torch.Tensor):
            return out, None
        if isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[0], torch.Tensor):
            return out[0], out[1]
        raise TeacherError(
            f"{self.description}: kdcache_features must return features (B, T, d) or "
            f"(features, hidden_states), got {type(out).__name__}"
        )

    def _run(self, ids: torch.Tensor) -> tuple[torch.Tensor, Sequence[torch.Tensor] | None]:
        with torch.inference_mode():
            out = self.module(ids.to(self.device, non_blocking=True))
        if isinstance(out, torch.Tensor):
            return out, None
        if isinstance(out, tuple | list) and len(out) == 2:
            return out[0], out[1]
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits, getattr(out, "hidden_states", None)
        raise TeacherError(
            f"{self.description}: the module must return logits (B, T, V) or "
            f"(logits, hidden_states), got {type(out).__name__}"
        )

    def _pick(
        self, hidden: Sequence[torch.Tensor] | None, layers: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        if not layers:
            return {}
        if hidden is None:
            raise TeacherError(
                f"{self.description}: the module returns no hidden states, "
                f"cannot tap layers {list(layers)}"
            )
        bad = [i for i in layers if not 0 <= i < len(hidden)]
        if bad:
            raise TeacherError(
                f"{self.description}: hidden layers {bad} out of range 0..{len(hidden) - 1}"
            )
        return {i: hidden[i] for i in layers}

    def forward(self, ids: torch.Tensor, layers: Sequence[int]) -> TeacherOutput:
        """ids: (B, T) int64 -> logits (B, T, V) + the requested hidden (B, T, d) layers."""
        logits, hidden = self._run(ids)
        return TeacherOutput(logits=logits, hidden=self._pick(hidden, layers))

    def forward_features(self, ids: torch.Tensor, layers: Sequence[int]) -> FeatureOutput:
        """ids: (B, T) int64 -> ``kdcache_features`` (B, T, d) + the requested hidden layers."""
        features, hidden = self._features(ids)
        return FeatureOutput(features=features, hidden=self._pick(hidden, layers))


def _load_hf(path: str, dtype: str, device: str | Sequence[str]) -> HFTeacher:
    root = Path(path)
    if not root.is_dir():
        raise TeacherError(f"teacher directory {path} does not exist")
    if not (root / "config.json").is_file():
        raise TeacherError(f"teacher directory {path} has no config.json")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own progress; tqdm bars are noise

    place = placement(device)
    dev = place.device
    tdtype = resolve_dtype(dtype, dev)
    extra: dict[str, Any] = {}
    if place.max_memory is not None:  # split over several GPUs: whole blocks, in order
        extra["device_map"] = plan_device_map(path, tdtype, place.max_memory)
    try:
        # transformers >= 4.56 spells it `dtype` (`torch_dtype` is deprecated); its default,
        # "auto", would load the checkpoint's dtype, so always pass one.
        model: nn.Module = AutoModelForCausalLM.from_pretrained(
            path, dtype=tdtype, local_files_only=True, **extra
        )
    except Exception as err:  # any loader failure is the same user problem
        raise TeacherError(f"cannot load teacher {path}: {type(err).__name__}: {err}") from None
    if "device_map" in extra:
        gpus = sorted(set(extra["device_map"].values()))
        where = "GPUs " + ",".join(map(str, gpus))
    else:
        model.to(dev)
        where = str(dev)
    desc = f"hf:{path} ({type(model).__name__}, {tdtype}, {where})"
    log.info("loaded teacher %s", desc)
    return HFTeacher(model, description=desc)


def _import_callable(target: str) -> Callable[[], Any]:
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise TeacherError(f'teacher module {target!r} must look like "pkg.mod:callable"')
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:  # the user's module may raise anything on import
        raise TeacherError(
            f"cannot import teacher module {target!r}: {type(err).__name__}: {err}"
        ) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise TeacherError(f"teacher module {target!r}: {mod_name} has no callable {attr!r}")
    return fn


def _load_module(target: str, dtype: str, device: str | Sequence[str]) -> HFTeacher | ModuleTeacher:
    fn = _import_callable(target)
    try:
        module = fn()
    except Exception as err:  # the user's factory may raise anything
        raise TeacherError(
            f"teacher module {target!r} failed: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(module, nn.Module):
        raise TeacherError(
            f"teacher module {target!r} must return an nn.Module, got {type(module).__name__}"
        )
    if not isinstance(device, str):
        raise TeacherError(
            f"teacher module {target!r}: a module teacher runs on one device, not {list(device)}"
        )
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    module.to(device=dev, dtype=tdtype)
    desc = f"module:{target} ({type(module).__name__}, {tdtype}, {dev})"
    log.info("loaded teacher %s", desc)
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return HFTeacher(module, description=desc)
    return ModuleTeacher(module, description=desc)


def load_teacher(spec: Any) -> Teacher:
    """Load the teacher a ``TeacherSpec`` (or any object with ``hf``, ``module``, ``dtype``,
    ``device``) names; raise :class:`TeacherError` naming the path or module on failure."""
    dtype = getattr(spec, "dtype", "auto") or "auto"
    device = getattr(spec, "device", "auto") or "auto"
    hf, module = getattr(spec, "hf", None), getattr(spec, "module", None)
    if (hf is None) == (module is None):
        raise TeacherError("the teacher spec must name exactly one of 'hf' or 'module'")
    if hf is not None:
        return _load_hf(str(hf), dtype, device)
    return _load_module(str(module), dtype, device)
