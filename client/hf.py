"""Distil with Hugging Face's ``Trainer`` from a kdcache cache: ``KDTrainer`` and ``KDConfig``.

``KDTrainer`` is a ``transformers.Trainer`` whose loss is
``alpha * CE + (1 - alpha) * KD + hidden_weight * hidden`` (see :class:`KDConfig`), computed from
the cache's batches. With a :class:`~kdcache.client.CacheDataset` as ``train_dataset``:

- Rows are dealt to ranks by the dataset alone, so each row is trained once per epoch over all
  ranks, whatever accelerate's ``dispatch_batches``/``split_batches``: the training loader is
  built here and never handed to ``accelerator.prepare`` (which would split each rank's share
  again). The dataset takes rank, world size and batch size from the ``TrainingArguments``, so it
  may be built before or after them. Rows repeated to even out the last step (fewer than one
  global batch) are logged.
- Batches reach :meth:`KDTrainer.compute_loss` whole, ``row`` and ``loss_mask`` included; there is
  no column removal to configure.
- Every checkpoint holds the dataset's ``state_dict`` (``kdcache_dataset.json``), and
  ``train(resume_from_checkpoint=...)`` restores it: the resumed run trains exactly the rows the
  uninterrupted run would have trained after that step, in the same order, without reading the
  skipped rows. The Trainer's own batch skipping (accelerate's ``skip_first_batches``) is turned
  into a no-op for this loader while ``train`` runs, so nothing is skipped twice.

Imported on demand (``from kdcache.client.hf import KDTrainer``): ``import kdcache.client`` does not
import transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from kdcache.client import losses
from kdcache.client._divergences import masked_mean
from kdcache.client._loader import CacheLoader
from kdcache.client.dataset import CacheDataset
from kdcache.client.distributed import end_distributed
from kdcache.client.layermap import HiddenProjector, LayerMap
from kdcache.client.layerselect import LearnedLayerMap

__all__ = ["DATASET_STATE_FILE", "KDConfig", "KDTrainer", "causal_lm_loss", "end_distributed"]

log = logging.getLogger(__name__)

DATASET_STATE_FILE = "kdcache_dataset.json"
PROJECTOR_NAME = "kd_projector"


@dataclass(frozen=True)
class KDConfig:
    """What :class:`KDTrainer` optimises: ``alpha * CE + (1 - alpha) * KD + hidden_weight * H``.

    temperature: of the KD term (must be cached for ``tail="bucket"``/``"ignore"``).
    alpha: weight of the hard-label cross-entropy on the cached tokens, in [0, 1]; the KD term
    gets ``1 - alpha``. divergence, tail, targets: as in :func:`kdcache.client.losses.kd_loss`
    (``targets``: ``"topk"``, ``"sample"``, ``"topk+sample"`` or None for kd_loss's default;
    sampled targets estimate forward KL only).
    layer_map: (student layer, teacher layer) pairs for a hidden-state loss, or None for none;
    hidden_weight and hidden_kind (``"mse"``/``"cosine"``) weigh and choose it. The learned
    projections (student width -> teacher width) live in the model as ``kd_projector``, so DDP,
    the optimiser and checkpoints include them. A :class:`LearnedLayerMap` (learned layer
    selection) is itself that module: it is added to the model, annealed by training progress
    (``global_step / max_steps``), and each student layer's chosen teacher layer and its weight
    are logged (``layer_<s>``, ``layer_<s>_weight``).
    Every term averages over the batch's ``loss_mask`` (all positions but each row's last when
    the cache has no mask).
    """

    temperature: float = 1.0
    alpha: float = 0.5
    divergence: str = "forward_kl"
    tail: str = "bucket"
    layer_map: LayerMap | LearnedLayerMap | None = None
    hidden_weight: float = 1.0
    hidden_kind: str = "mse"
    targets: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be > 0; got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha (the CE weight) must be in [0, 1]; got {self.alpha!r}")
        for name, value, choices in (
            ("divergence", self.divergence, losses.DIVERGENCES),
            ("tail", self.tail, losses.TAILS),
            ("hidden_kind", self.hidden_kind, losses.HIDDEN_KINDS),
        ):
            if value not in choices:
                problems.append(f"{name} must be one of {list(choices)}; got {value!r}")
        if self.targets is not None and self.targets not in losses.TARGETS:
            problems.append(f"targets must be one of {list(losses.TARGETS)}; got {self.targets!r}")
        elif self.targets in ("sample", "topk+sample") and self.divergence != "forward_kl":
            problems.append(
                f"targets={self.targets!r} estimates forward KL only; got divergence "
                f"{self.divergence!r}"
            )
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            problems.append(f"hidden_weight must be >= 0; got {self.hidden_weight!r}")
        if problems:
            raise ValueError("invalid KDConfig:\n  " + "\n  ".join(problems))

    @property
    def uses_hidden(self) -> bool:
        return self.layer_map is not None and self.hidden_weight > 0

    def fields(self) -> list[str]:
        """Dataset fields this configuration reads."""
        out = ["input_ids", "loss_mask"]
        if self.alpha < 1:
            kinds = (self.targets or "topk").split("+")
            if "topk" in kinds:
                out += ["topk_logprobs", "topk_indices", "topk_logsumexp"]
            if "sample" in kinds:
                out += ["sample_indices", "sample_counts", "sample_logprobs"]
                if "topk" not in kinds and self.temperature != 1.0:
                    out.append("topk_logsumexp")  # the normalisers that reweight the draws
        if self.uses_hidden and self.layer_map is not None:
            out += [f"hidden_{t}" for t in sorted(set(self.layer_map.teacher_layers))]
        return out


def causal_lm_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy: position j predicts ``input_ids[:, j + 1]``; a scalar.

    logits: (B, T, V); input_ids: (B, T) int; mask: (B, T) bool, the positions whose prediction
    is trained (a cache's ``loss_mask``), or None for all T - 1 that have a next token.
    Computed in float64 for float64 logits, else float32.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    pred = logits[:, :-1].to(dtype)
    per_position = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(pred.shape[:2])
    return masked_mean(per_position, None if mask is None else mask[:, :-1])


class _EpochLoader(CacheLoader):
    """The training loader: a CacheLoader the Trainer can ``set_epoch`` and fast-forward."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def fast_forward(self, epoch: int, batches: int) -> None:
        """Position the dataset after ``batches`` batches of ``epoch`` (this rank, this layout),
        by arithmetic: no row is read."""
        state = self.dataset.state_dict()
        state.update(epoch=epoch, start=0, consumed=batches * self.batch_size)
        self.dataset.load_state_dict(state)


class KDTrainer(Trainer):
    """A ``transformers.Trainer`` that distils from a kdcache cache (see the module docstring).

    ``kd``: the loss (default ``KDConfig()``). Other arguments are the Trainer's. The batch given
    to :meth:`compute_loss` holds the dataset's fields: ``row`` (B,), ``input_ids`` (B, T),
    ``topk_*``, ``temperatures``, ``loss_mask`` (B, T) and ``hidden_<l>`` as asked. An ensemble
    dataset (``CacheDataset([a, b, ...], weights=...)``) works too: the KD term is then the
    mixture loss of :mod:`kdcache.client.ensemble` (no hidden-state term).
    ``data_collator`` and ``remove_unused_columns`` do not apply to a CacheDataset.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *rest: Any,
        kd: KDConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.kd = kd or KDConfig()
        # the Trainer's positional order: data_collator, train_dataset, ...
        dataset = kwargs.get("train_dataset", rest[1] if len(rest) > 1 else None)
        if isinstance(dataset, CacheDataset):
            _check_fields(dataset, self.kd)
        if model is not None and self.kd.uses_hidden:
            _attach_projector(model, self.kd, dataset)
            if args is not None:
                _no_unused_parameter_search(args)
        super().__init__(model, args, *rest, **kwargs)
        self._resume_dir: str | None = None
        self._dataset_restored = False
        self._parts: dict[str, Tensor] = {}
        self._parts_n = 0

    # ---- data -----------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        dataset = self.train_dataset
        if not isinstance(dataset, CacheDataset):
            return super().get_train_dataloader()
        args = self.args
        size = self._train_batch_size
        if dataset.batch_size is not None and dataset.batch_size != size:
            raise ValueError(
                f"the CacheDataset's batch_size {dataset.batch_size} differs from the Trainer's "
                f"per-device batch {size}; leave the dataset's unset or make them equal"
            )
        if args.dataloader_persistent_workers:
            raise ValueError(
                "dataloader_persistent_workers=True would keep the first epoch's dataset copy in "
                "each worker, so epochs and resume would not reach them; set it to False"
            )
        dataset.set_partition(args.process_index, args.world_size, size)
        self._restore_dataset(dataset)
        if args.process_index == 0 and dataset.padded_rows:
            log.warning(
                "KDTrainer: repeating %d of %d rows each epoch so all %d ranks get equal "
                "batches (global batch %d)",
                dataset.padded_rows,
                dataset.manifest.num_rows,
                dataset.world_size,
                dataset.global_batch,
            )
        kwargs: dict[str, Any] = {
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
        }
        if args.dataloader_num_workers > 0:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
            kwargs["multiprocessing_context"] = args.dataloader_multiprocessing_context
        return _EpochLoader(dataset, size, **kwargs)

    def _restore_dataset(self, dataset: CacheDataset) -> None:
        """Load the checkpoint's dataset state when resuming (and not ``ignore_data_skip``);
        otherwise start at the beginning of epoch 0, as the Trainer does."""
        self._dataset_restored = False
        if self._resume_dir is None or self.args.ignore_data_skip:
            state = dataset.state_dict()
            state.update(epoch=0, start=0, consumed=0)
            dataset.load_state_dict(state)
            return
        path = os.path.join(self._resume_dir, DATASET_STATE_FILE)
        if not os.path.isfile(path):
            log.warning(
                "%s has no %s; the dataset is fast-forwarded by the Trainer's step count",
                self._resume_dir,
                DATASET_STATE_FILE,
            )
            return
        with open(path) as f:
            dataset.load_state_dict(json.load(f))
        self._dataset_restored = True

    @contextlib.contextmanager
    def _own_batch_skipping(self) -> Iterator[None]:
        """While training, the Trainer's ``skip_first_batches`` leaves our loader to us: it is
        already positioned (restored state) or is fast-forwarded by arithmetic."""
        import transformers.trainer as hf_trainer

        original = getattr(hf_trainer, "skip_first_batches", None)
        if original is None:
            yield
            return

        def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
            if not isinstance(dataloader, _EpochLoader):
                return original(dataloader, num_batches)
            if not self._dataset_restored:
                per_epoch = _updates_per_epoch(len(dataloader), self.args)
                dataloader.fast_forward(self.state.global_step // per_epoch, num_batches)
            return dataloader

        hf_trainer.skip_first_batches = skip_first_batches
        try:
            yield
        finally:
            hf_trainer.skip_first_batches = original

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        ckpt = resume_from_checkpoint
        if isinstance(ckpt, bool):
            ckpt = get_last_checkpoint(self.args.output_dir) if ckpt else None
        self._resume_dir = ckpt
        try:
            with self._own_batch_skipping():
                return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resume_dir = None

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        super()._save_checkpoint(model, trial, *args, **kwargs)
        dataset = self.train_dataset
        if not isinstance(dataset, CacheDataset) or not self.args.should_save:
            return
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        path = os.path.join(self._get_output_dir(trial=trial), folder, DATASET_STATE_FILE)
        if os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as f:
                json.dump(dataset.state_dict(), f, indent=1)

    # ---- loss -----------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``alpha * CE + (1 - alpha) * KD + hidden_weight * hidden`` over ``loss_mask``."""
        kd = self.kd
        outputs = model(input_ids=inputs["input_ids"], output_hidden_states=kd.uses_hidden)
        logits = outputs.logits
        mask = inputs.get("loss_mask")
        parts: dict[str, Tensor] = {}
        if kd.alpha < 1:
            parts["kd_loss"] = losses.kd_loss(
                logits,
                inputs,
                kd.temperature,
                kd.divergence,
                kd.tail,
                mask=mask,
                targets=kd.targets,
            )
        if kd.alpha > 0:
            parts["ce_loss"] = causal_lm_loss(logits, inputs["input_ids"], mask)
        if kd.uses_hidden and kd.layer_map is not None:
            projector = getattr(self.accelerator.unwrap_model(model), PROJECTOR_NAME)
            layer_map = kd.layer_map
            if isinstance(projector, LearnedLayerMap):
                if model.training:
                    projector.anneal(self.state.global_step / max(self.state.max_steps, 1))
                layer_map, projector = projector, None
            parts["hidden_loss"] = losses.hidden_losses(
                outputs.hidden_states, inputs, layer_map, projector, kd.hidden_kind, mask
            )
        loss = (1 - kd.alpha) * parts.get("kd_loss", 0.0) + kd.alpha * parts.get("ce_loss", 0.0)
        loss = loss + kd.hidden_weight * parts.get("hidden_loss", 0.0)
        self._record(parts)
        return (loss, outputs) if return_outputs else loss

    def _record(self, parts: Mapping[str, Tensor]) -> None:
        for name, value in parts.items():
            self._parts[name] = self._parts.get(name, 0.0) + value.detach().float()
        self._parts_n += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each loss term since the last log (this rank's) to the Trainer's."""
        if "loss" in logs and self._parts_n:
            for name, total in self._parts.items():
                logs[name] = round(float(total) / self._parts_n, 6)
            self._parts, self._parts_n = {}, 0
            learned = getattr(self.accelerator.unwrap_model(self.model), PROJECTOR_NAME, None)
            if isinstance(learned, LearnedLayerMap):
                for s, row in learned.weights().items():
                    chosen = max(row, key=row.__getitem__)
                    logs[f"layer_{s}"], logs[f"layer_{s}_weight"] = chosen, round(row[chosen], 6)
        super().log(logs, *args, **kwargs)


def _updates_per_epoch(batches: int, args: Any) -> int:
    """Optimiser steps per epoch, as the Trainer counts them (a last partial one included)."""
    accumulate = args.gradient_accumulation_steps
    return max(batches // accumulate + int(batches % accumulate > 0), 1)


def _check_fields(dataset: CacheDataset, kd: KDConfig) -> None:
    if dataset.weights is not None and kd.uses_hidden:
        raise ValueError(
            f"KDConfig.layer_map asks for a hidden-state loss, but the CacheDataset is an "
            f"ensemble of {len(dataset.sources)} caches, whose hidden states are per teacher "
            "(teacher{j}_hidden_<l>); KDTrainer distils an ensemble's logits only"
        )
    have = set(dataset.fields)
    if "sample_logprob_sums" in have and kd.temperature == 1.0:
        have.add("sample_logprobs")  # their sums serve at t=1 (outputs.sample_logprobs: false)
    missing = [f for f in kd.fields() if f not in have]
    if missing:
        raise ValueError(
            f"KDTrainer with {kd} needs the dataset fields {missing}; the CacheDataset has "
            f"{dataset.fields} (ask for fields=['input_ids', 'topk', 'hidden_<layer>'...])"
        )


def _no_unused_parameter_search(args: TrainingArguments) -> None:
    """The projections run outside the model's forward, where DDP's search for unused
    parameters would count them unused and then fail when their gradients arrive."""
    if args.ddp_find_unused_parameters:
        raise ValueError(
            "ddp_find_unused_parameters=True does not work with KDConfig's hidden-state loss "
            "(its projections run outside the model's forward); leave it unset or False"
        )
    args.ddp_find_unused_parameters = False


def _attach_projector(model: nn.Module, kd: KDConfig, dataset: Any) -> None:
    """Give ``model`` a ``kd_projector`` (student width -> teacher width) unless it has one."""
    if hasattr(model, PROJECTOR_NAME) or kd.layer_map is None:
        return
    if isinstance(kd.layer_map, LearnedLayerMap):
        module: nn.Module = kd.layer_map
    else:
        module = _projector_for(model, kd.layer_map, dataset)
    param = next(model.parameters(), None)
    if param is not None:
        module.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    model.add_module(PROJECTOR_NAME, module)


def _projector_for(model: nn.Module, layer_map: LayerMap, dataset: Any) -> HiddenProjector:
    if not isinstance(dataset, CacheDataset) or dataset.manifest.hidden_size is None:
        raise ValueError(
            f"a hidden-state loss needs the teacher's width: pass a CacheDataset with hidden "
            f"layers as train_dataset, or give the model a '{PROJECTOR_NAME}' module"
        )
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if width is None:
        raise ValueError(f"cannot tell the student's width from {type(model).__name__}.config")
    m = dataset.manifest  # a pca:R cache's codes are R wide unless decoded to full width
    teacher_width = m.hidden_size if dataset.decode_hidden else m.hidden_width
    if teacher_width is None:
        raise ValueError("the cache's manifest has hidden layers but no hidden width")
    return HiddenProjector(layer_map, int(width), teacher_width)
