"""Where a teacher's weights go: one device, or split across a worker's GPUs.

A 70B teacher in bfloat16 is 140 GB, more than one GPU holds. ``teacher.device: auto`` on a worker
that sees several GPUs, or an explicit list such as ``[cuda:0, cuda:1]``, places a Hugging Face
teacher across them with accelerate's device map (Transformers' ``device_map`` argument): whole
decoder blocks, in order, filling each GPU before the next ("sequential"), so a teacher that fits
on one GPU stays on one and pays no cross-device copies. One worker process runs one such replica;
run one worker per replica (``CUDA_VISIBLE_DEVICES`` picks its GPUs).

:func:`placement` decides from the spec and the GPUs this process sees; :func:`plan_device_map`
shows the split a placement gives (it builds the model on the ``meta`` device, no weights read),
which is what the tests check on a CPU and ``bench/gpu_check.py`` checks on GPUs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.core.errors import TeacherError

__all__ = ["HEADROOM", "Placement", "placement", "plan_device_map"]

HEADROOM = 0.10
"""Share of each GPU's memory kept free of weights, for activations and the head's chunks."""

_CUDA = re.compile(r"cuda:(\d+)")


@dataclass(frozen=True)
class Placement:
    """One device, or a split over ``gpus`` (``max_memory``: bytes of weights per GPU index)."""

    device: torch.device
    max_memory: dict[int, int] | None = None

    @property
    def split(self) -> bool:
        return self.max_memory is not None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """What ``AutoModelForCausalLM.from_pretrained`` needs to load this placement."""
        if self.max_memory is None:
            return {}
        return {"device_map": "sequential", "max_memory": dict(self.max_memory)}


def _gpu_bytes(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory)


def placement(
    device: str | Sequence[str],
    *,
    gpu_count: Callable[[], int] = torch.cuda.device_count,
    gpu_bytes: Callable[[int], int] = _gpu_bytes,
) -> Placement:
    """The placement a spec's ``teacher.device`` asks for on this machine.

    ``auto``: all visible GPUs when there are several, one GPU, else the CPU. A list of
    ``cuda:N``: those GPUs (one entry means that device alone). Anything else: that device.
    ``gpu_count`` and ``gpu_bytes`` default to torch's view of this machine.
    """
    if isinstance(device, str) and device != "auto":
        try:
            return Placement(torch.device(device))
        except RuntimeError as err:
            raise TeacherError(f"bad teacher device {device!r}: {err}") from None
    if isinstance(device, str):  # auto
        n = gpu_count()
        if n == 0:
            return Placement(torch.device("cpu"))
        indices = list(range(n))
    else:
        indices = []
        for d in device:
            m = _CUDA.fullmatch(d)
            if m is None:
                raise TeacherError(f"teacher device list entries must be cuda:N, got {d!r}")
            indices.append(int(m.group(1)))
        visible = gpu_count()
        missing = [i for i in indices if i >= visible]
        if missing:
            raise TeacherError(
                f"teacher devices {[f'cuda:{i}' for i in missing]} not present: "
                f"this worker sees {visible} GPU(s)"
            )
    if len(indices) == 1:
        return Placement(torch.device(f"cuda:{indices[0]}"))
    budget = {i: int(gpu_bytes(i) * (1 - HEADROOM)) for i in sorted(set(indices))}
    return Placement(torch.device(f"cuda:{min(budget)}"), max_memory=budget)


def plan_device_map(
    model_dir: str | Path, dtype: torch.dtype, max_memory: dict[int, int]
) -> dict[str, int | str]:
    """The module -> GPU map a split placement gives, computed on the ``meta`` device.

    Raises :class:`TeacherError` when the teacher does not fit in ``max_memory`` (accelerate
    would otherwise put the rest on the CPU or disk, silently slow).
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    budget: dict[int | str, int] = {"cpu": 0}
    budget.update((i, b) for i, b in max_memory.items())
    dmap: dict[str, int | str] = infer_auto_device_map(
        model,
        max_memory=budget,
        no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
        dtype=dtype,
    )
    off = sorted(k for k, v in dmap.items() if not isinstance(v, int))
    if off:
        total = sum(max_memory.values()) / 2**30
        raise TeacherError(
            f"teacher {model_dir} does not fit in {total:.1f} GiB over GPUs "
            f"{sorted(max_memory)}: {off[:3]} would go to {dmap[off[0]]}"
        )
    return dmap
