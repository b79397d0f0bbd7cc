"""Sequence-level KD (Kim & Rush 2016): the teacher continues each prompt; the cache stores that.

A job with a ``generate`` section (:class:`~kdcache.core.spec.GenerateSpec`) reads its dataset's
rows as prompts. :class:`GenerationSource` wraps that dataset as another
:class:`~kdcache.worker.datasets.DatasetSource`: its rows are the prompts continued by the teacher,
so the shard runner, the lease loop and the cache format stay as they are, and the teacher's top-k,
samples and hidden states are then taken over its own generations (a second, ordinary pass)::

    input_ids  (n, T + M)  prompt (its real tokens), continuation, then pad_id to the end
    loss_mask  (n, T + M)  true at j when token j+1 is a generated one (EOS included)

T is the prompts' row length, M = ``max_new_tokens``. A prompt's real length is one more than its
last trained position (``loss_mask``): a whole row for ``.npy`` tokens and packed text, the
document for ``pack: false`` text (its padding is dropped, never continued).

Generation is Hugging Face ``generate`` with its KV cache, a batch of ``batch_size`` prompts at a
time, left-padded. Greedy is argmax; sampling (temperature, top-p) draws token s of dataset row r
by inverse CDF with one uniform from a Philox stream keyed by ``(seed, r)``
(:class:`RowSampler`), so a row's continuation does not depend on its batch, its shard's attempt,
or the worker: a resumed or re-leased shard is generated again with the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from kdcache.core.errors import Problem, SpecError
from kdcache.core.spec import GenerateSpec
from kdcache.worker.datasets import DatasetSource
from kdcache.worker.extract import check_ids
from kdcache.worker.teachers import Teacher

__all__ = [
    "GenerationSource",
    "RowSampler",
    "generate_rows",
    "prompt_lengths",
    "step_uniforms",
]

log = logging.getLogger(__name__)

_STREAM = 0x5E9  # the generator's Philox counter offset: apart from outputs.sample_draws' stream


def prompt_lengths(loss_mask: np.ndarray) -> np.ndarray:
    """(n,) int64 real tokens of each prompt row: one past its last trained position, at least 1.

    loss_mask: (n, T) bool of the prompt rows (false on the last column and before padding).
    """
    n, t = loss_mask.shape
    any_true = loss_mask.any(axis=1)
    last = t - 1 - np.argmax(loss_mask[:, ::-1], axis=1)
    return np.where(any_true, np.minimum(last + 2, t), min(1, t)).astype(np.int64)


def step_uniforms(seed: int, rows: range, steps: int) -> np.ndarray:
    """(len(rows), steps) float64 uniforms in [0, 1): row r's depend only on ``(seed, r)``."""
    out = np.empty((len(rows), steps), dtype=np.float64)
    for i, row in enumerate(rows):
        bits = np.random.Philox(key=[int(seed), int(row)], counter=[0, 0, 0, _STREAM])
        out[i] = np.random.Generator(bits).random(steps)
    return out


class RowSampler:
    """A ``transformers`` logits processor that samples each row with its own uniforms.

    Returns scores that are 0 at the drawn token and -inf elsewhere, so ``generate`` run greedy
    picks exactly that token. Draws from softmax(scores / temperature) restricted to the
    smallest set of most likely tokens whose mass reaches ``top_p`` (ties by id), by inverse CDF
    in float64 with the uniform of (row, step): over the ids in vocabulary order, or, with
    ``top_p < 1``, in order of probability.

    uniforms: (B, M) float64, row i of the batch; ``prompt_width``: the batch's padded prompt
    length (step = current length - prompt_width).
    """

    def __init__(
        self, uniforms: np.ndarray, prompt_width: int, temperature: float, top_p: float
    ) -> None:
        self.uniforms = torch.from_numpy(uniforms)
        self.prompt_width, self.temperature, self.top_p = prompt_width, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        u = self.uniforms[:, step].to(scores.device).unsqueeze(-1)  # (B, 1)
        p = torch.softmax(scores.double() / self.temperature, dim=-1)
        order = None
        if self.top_p < 1.0:  # the nucleus needs the ids by probability; plain sampling not
            p, order = torch.sort(p, dim=-1, descending=True, stable=True)
            p = torch.where(p.cumsum(-1) - p < self.top_p, p, 0.0)  # the first always kept
        cdf = p.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True)
        # right=True skips zero-mass slots: their cdf equals their predecessor's
        token = pick.clamp_(max=p.shape[-1] - 1)
        if order is not None:
            token = order.gather(-1, token)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


def _ids_of(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _hf_model(teacher: Teacher) -> Any:
    model = getattr(teacher, "model", None)
    if model is None or not callable(getattr(model, "generate", None)):
        raise SpecError(
            [
                Problem(
                    "generate",
                    f"{teacher.description} cannot generate: use a Hugging Face teacher "
                    "(teacher.hf, or a teacher.module returning a PreTrainedModel)",
                )
            ]
        )
    return model


def _special_ids(model: Any) -> tuple[list[int], int]:
    """The teacher's EOS ids and the pad id of its rows (its pad, else its EOS, else 0)."""
    gc, cfg = getattr(model, "generation_config", None), model.config
    eos = _ids_of(getattr(gc, "eos_token_id", None)) or _ids_of(getattr(cfg, "eos_token_id", None))
    pads = _ids_of(getattr(gc, "pad_token_id", None)) or _ids_of(getattr(cfg, "pad_token_id", None))
    return eos, (pads or eos or [0])[0]


def _continuations(new: np.ndarray, eos: list[int], stop_at_eos: bool) -> list[np.ndarray]:
    """Each row's generated tokens: up to and including its first EOS when stopping there."""
    if not stop_at_eos or not eos:
        return list(new)
    out = []
    for row in new:
        hits = np.flatnonzero(np.isin(row, eos))
        out.append(row[: hits[0] + 1] if hits.size else row)
    return out


@contextmanager
def _plain_generation(model: Any, config: Any) -> Iterator[None]:
    """Let ``generate`` see only ``config``: it fills every unset option from the model's own
    ``generation_config`` (a checkpoint's repetition penalty, banned words, EOS ...), which would
    make greedy rows differ from the teacher's argmax and ``stop_at_eos: false`` stop anyway."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def generate_rows(
    teacher: Teacher,
    prompts: np.ndarray,
    lengths: np.ndarray,
    gen: GenerateSpec,
    *,
    batch_size: int,
    row_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Continue ``prompts`` (n, T) int64 (real lengths ``lengths`` (n,)) with the teacher.

    Returns (ids, loss_mask), each (n, T + M): see the module docstring. ``row_offset`` is the
    dataset row of ``prompts[0]`` (it keys the draws and is named in errors).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    model = _hf_model(teacher)
    check_ids(prompts, teacher.vocab_size, row_offset)
    eos, pad = _special_ids(model)
    n, t = prompts.shape
    m = gen.max_new_tokens
    ids = np.full((n, t + m), pad, dtype=np.int64)
    mask = np.zeros((n, t + m), dtype=bool)
    config = GenerationConfig(
        max_new_tokens=m,
        do_sample=False,  # sampling is RowSampler's, seeded per row
        num_beams=1,
        eos_token_id=eos if gen.stop_at_eos and eos else None,
        pad_token_id=pad,
        use_cache=True,
    )
    device = teacher.device
    for start in range(0, n, batch_size):
        end = min(n, start + batch_size)
        lens = lengths[start:end]
        width = int(lens.max())
        batch = np.full((end - start, width), pad, dtype=np.int64)
        attn = np.zeros((end - start, width), dtype=np.int64)
        for i, length in enumerate(lens):  # left padding: every prompt ends at column width-1
            batch[i, width - length :] = prompts[start + i, :length]
            attn[i, width - length :] = 1
        processors = LogitsProcessorList()
        if gen.do_sample:
            u = step_uniforms(gen.seed, range(row_offset + start, row_offset + end), m)
            processors.append(RowSampler(u, width, gen.temperature, gen.top_p))
        with torch.inference_mode(), _plain_generation(model, config):
            out = model.generate(
                input_ids=torch.from_numpy(batch).to(device),
                attention_mask=torch.from_numpy(attn).to(device),
                generation_config=config,
                logits_processor=processors,
            )
        new = out[:, width:].cpu().numpy()
        for i, cont in enumerate(_continuations(new, eos, gen.stop_at_eos)):
            r, length, g = start + i, int(lens[i]), len(cont)
            ids[r, :length] = prompts[r, :length]
            ids[r, length : length + g] = cont
            mask[r, length - 1 : length + g - 1] = True
        log.debug("generated rows %d..%d", row_offset + start, row_offset + end)
    return ids, mask


class GenerationSource:
    """The prompts of ``source`` continued by ``teacher``: a :class:`DatasetSource`.

    A shard's rows are generated once, on first request, and kept until another range is asked
    for (the runner reads a shard's ``rows`` and then its ``loss_mask``).
    """

    def __init__(
        self, source: DatasetSource, teacher: Teacher, gen: GenerateSpec, batch_size: int
    ) -> None:
        _hf_model(teacher)
        self.source, self.teacher, self.gen, self.batch_size = source, teacher, gen, batch_size
        self.num_rows: int = source.num_rows
        self.seq_len: int = source.seq_len + gen.max_new_tokens
        self.fingerprint_extra: dict[str, Any] = {
            **source.fingerprint_extra,
            "generate": gen.identity,
        }
        self._last: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def _generated(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[:2] != (start, end):
            prompts = self.source.rows(start, end)
            lengths = prompt_lengths(self.source.loss_mask(start, end))
            ids, mask = generate_rows(
                self.teacher,
                prompts,
                lengths,
                self.gen,
                batch_size=self.batch_size,
                row_offset=start,
            )
            self._last = (start, end, ids, mask)
        return self._last[2], self._last[3]

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, T + M) int64: prompt, continuation, padding."""
        return self._generated(start, end)[0].copy()

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """(end - start, T + M) bool: true where the next token is a generated one."""
        return self._generated(start, end)[1].copy()
