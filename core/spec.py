"""The job spec: one pydantic model shared by the REST API, the CLI and the worker.

A spec is checked in two steps. :func:`parse_spec` checks its shape (types, ranges, exactly one
teacher source, ...); :func:`kdcache.core.resolve.resolve_job` then checks it against the files it
names (teacher config, dataset header). Both report every problem at once, each naming its field.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdcache.core.errors import Problem, SpecError
from kdcache.core.hidden_codec import parse_hidden_codec

__all__ = [
    "DatasetSpec",
    "GenerateSpec",
    "JobSpec",
    "OutputSpec",
    "TeacherSpec",
    "load_spec",
    "parse_spec",
    "read_spec_file",
]

DType = Literal["auto", "float32", "bfloat16", "float16"]
HiddenDType = Literal["bfloat16", "float16", "float32"]
TopkCodec = Literal[
    "fp16",
    "lossless",
    "q8",
    "q4",
    "q8c",
    "q6c",
    "q4c",
    "q3c",
    "fp16-xz",
    "lossless-xz",
    "q8-xz",
    "q4-xz",
    "q8c-xz",
    "q6c-xz",
    "q4c-xz",
    "q3c-xz",
]
# ASCII digits only: \d also matches other scripts' digits ("uniform:٣"), which int() accepts.
_UNIFORM = re.compile(r"^uniform:([0-9]{1,6})$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]{1,4}|mps)$")
MIN_TEMPERATURE, MAX_TEMPERATURE, MAX_TEMPERATURES = 0.01, 1000.0, 64


def _types(annotation: Any) -> set[Any]:
    """Every type an annotation names (through unions, lists, literals' value types)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return {type(a) for a in args}
    if not args:
        return {annotation}
    return set().union(*(_types(a) for a in args))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: Any) -> Any:
        """``true`` where a number goes is refused (pydantic would read it as 1)."""
        items = value if isinstance(value, (list, tuple)) else [value]
        if not any(isinstance(v, bool) for v in items):
            return value
        types = _types(cls.model_fields[info.field_name].annotation)
        if bool not in types and types & {int, float}:
            raise ValueError(f"expected a number, got a boolean: {value!r}")
        return value


class TeacherSpec(_Model):
    """Which teacher to run: a local Hugging Face directory or a ``"pkg.mod:callable"``."""

    hf: str | None = Field(None, description="local Hugging Face directory (AutoModelForCausalLM)")
    module: str | None = Field(
        None, description='"pkg.mod:callable" returning an nn.Module: ids (B,T) -> logits (B,T,V)'
    )
    dtype: DType = Field("auto", description="auto = bfloat16 on CUDA, float32 on CPU")
    device: str | list[str] = Field(
        "auto",
        description="auto | cpu | cuda | cuda:N, or a list of cuda:N to split the teacher over "
        "(auto: every GPU the worker sees when there are several)",
    )

    @field_validator("module")
    @classmethod
    def _module_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError('must look like "package.module:callable"')
        return v

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v or any(not re.fullmatch(r"cuda:\d+", d) for d in v):
                raise ValueError("a device list must be one or more cuda:N")
            if len(set(v)) != len(v):
                raise ValueError("a device list must not repeat a device")
            return v
        if not _DEVICE.match(v):
            raise ValueError("must be auto, cpu, cuda or cuda:N, or a list of cuda:N")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.hf is None) == (self.module is None):
            raise ValueError("give exactly one of 'hf' (a local directory) or 'module'")
        return self


class DatasetSpec(_Model):
    """The static dataset: an (N, T) integer ``.npy`` array, or documents tokenised here.

    Documents come from a JSON lines file (``jsonl``) or a local Hugging Face dataset (``hf``);
    each is plain text (``text_field``) or a conversation (``messages_field``: a list of
    ``{role, content}``, rendered with the tokenizer's chat template and trained on the
    assistant's tokens only).
    """

    tokens: str | None = Field(None, description="(N, T) integer .npy file, memory-mapped")
    jsonl: str | None = Field(None, description="JSON lines file with one document per line")
    hf: str | None = Field(
        None,
        description="local datasets.save_to_disk folder, or parquet/arrow/json(l) file(s)",
    )
    text_field: str | None = Field(
        None, min_length=1, description="field holding plain text (default: text)"
    )
    messages_field: str | None = Field(
        None, min_length=1, description="field holding a conversation [{role, content}]"
    )
    split: str | None = Field(None, min_length=1, description="split of an hf dataset (train)")
    max_rows: int | None = Field(None, ge=1, description="use the first max_rows documents")
    tokenizer: str | None = Field(None, description="local tokenizer dir; default: the teacher's")
    seq_len: int | None = Field(None, ge=2, description="row length for jsonl/hf datasets")
    pack: bool = Field(True, description="concatenate documents (EOS-separated) into full rows")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        given = [k for k in ("tokens", "jsonl", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'tokens' (.npy), 'jsonl' or 'hf'")
        if self.tokens is None and self.seq_len is None:
            raise ValueError(f"'seq_len' is required with '{given[0]}'")
        if self.tokens is not None:
            bad = [
                k for k in ("messages_field", "split", "max_rows") if getattr(self, k) is not None
            ]
            if bad:
                raise ValueError(f"{bad} only apply to 'jsonl' or 'hf' datasets")
        if self.split is not None and self.hf is None:
            raise ValueError("'split' only applies to 'hf' datasets")
        if self.messages_field is not None and self.text_field is not None:
            raise ValueError("give 'text_field' (plain text) or 'messages_field', not both")
        return self

    @property
    def field(self) -> str:
        """The field each document is read from: ``messages_field``, else ``text_field``."""
        return self.messages_field or self.text_field or "text"

    @property
    def documents(self) -> str | None:
        """The path of a document dataset (jsonl or hf), None for tokens."""
        return self.jsonl or self.hf


class OutputSpec(_Model):
    """What to keep of each teacher forward."""

    topk: int = Field(64, ge=0, description="top-k log-probabilities per position, 0 for none")
    temperatures: list[float] = Field(
        default_factory=lambda: [1.0],
        description="log-sum-exp over the full vocabulary is stored for each; 1.0 is always kept",
    )
    hidden_layers: list[int] | str = Field(
        default_factory=list,
        description='HF hidden_states indices, or "uniform:S" for an S-layer student',
    )
    hidden_dtype: HiddenDType = "bfloat16"
    sample_draws: int = Field(
        0, ge=0, le=65535, description="draws per position from the teacher at t=1; 0 = off"
    )
    sample_seed: int = Field(0, ge=0, lt=1 << 63, description="seed of the draws (per row)")
    sample_logprobs: bool = Field(
        True,
        description="keep each draw's log-probability (sampled targets at any cached "
        "temperature); false: two sums per position instead, t=1 only, ~half the sampled bytes",
    )
    topk_codec: TopkCodec = Field(
        "fp16",
        description="fp16 (format v1) | lossless (format v2: the same fp16 values and ids in "
        "fewer bytes) | q8 | q4 (lossy: 8 / 4-bit log-probs with a range per position) | "
        "q8c | q6c | q4c | q3c (lossy, companded: less error at the same bits); each with "
        "-xz (lossless-xz, q4c-xz, ...; format v3): the same values in fewer bytes, LZMA2 and "
        "the dataset's id order, slower to write and decode",
    )
    hidden_codec: str = Field(
        "exact",
        description="exact (hidden_dtype, format v1) | int8 | int6 | int5 | int4 | fp8 (codes "
        "with a scale per "
        "token) | pca:R (R principal components, basis fitted on the first rows)",
    )

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        if len(v) > MAX_TEMPERATURES:
            raise ValueError(f"at most {MAX_TEMPERATURES} temperatures, got {len(v)}")
        bad = [t for t in v if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE]
        if bad:
            raise ValueError(
                f"temperatures must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] (logits / t "
                f"overflows below), got {bad[:5]}"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"temperatures must be distinct, got {v}")
        # z_v = logprob_v + lse_1 needs lse at t=1, so t=1 is always cached (first when added).
        return v if 1.0 in v else [1.0, *v]

    @field_validator("hidden_layers")
    @classmethod
    def _layers(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, str):
            m = _UNIFORM.match(v.strip())
            if not m or int(m.group(1)) < 1:
                raise ValueError('must be a list of layer indices or "uniform:S" with S >= 1')
            return v.strip()
        neg = [i for i in v if i < 0]
        if neg:
            raise ValueError(f"layer indices must be >= 0, got {neg}")
        if len(set(v)) != len(v):
            raise ValueError(f"layer indices must be distinct, got {v}")
        return v

    @field_validator("hidden_codec")
    @classmethod
    def _hidden_codec(cls, v: str) -> str:
        return parse_hidden_codec(v).name

    @model_validator(mode="after")
    def _something(self) -> OutputSpec:
        if self.topk == 0 and not self.hidden_layers and not self.sample_draws:
            raise ValueError("nothing to keep: set topk > 0, sample_draws > 0 or hidden_layers")
        if self.hidden_codec != "exact" and not self.hidden_layers:
            raise ValueError(
                f"hidden_codec {self.hidden_codec!r} codes hidden states, but hidden_layers "
                "keeps none"
            )
        return self

    def uniform_student_layers(self) -> int | None:
        """S of ``"uniform:S"``, or None for an explicit layer list."""
        if isinstance(self.hidden_layers, str):
            m = _UNIFORM.match(self.hidden_layers)
            return int(m.group(1)) if m else None
        return None


class GenerateSpec(_Model):
    """Sequence-level KD (Kim & Rush 2016): the teacher continues each dataset row (a prompt).

    The cache's ``input_ids`` are then prompt + continuation, right-padded to ``seq_len +
    max_new_tokens``, with ``loss_mask`` true only where the next token is a generated one; the
    teacher's top-k, samples and hidden states are taken over those rows. Sampling draws one
    uniform per (row, step) keyed by ``(seed, dataset row)``, so a row's continuation does not
    depend on which batch, shard attempt or worker generates it.
    """

    max_new_tokens: int = Field(..., ge=1, le=1 << 16, description="tokens generated per prompt")
    do_sample: bool = Field(False, description="false: greedy; true: sample (seeded per row)")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int = Field(0, ge=0, lt=1 << 63, description="seed of the draws (per dataset row)")
    stop_at_eos: bool = Field(True, description="end a continuation at the teacher's EOS")

    @model_validator(mode="after")
    def _sampling_only(self) -> GenerateSpec:
        if not self.do_sample:
            # values, not fields set: a dumped spec (job.json, a lease) names every field
            given = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
            bad = [k for k, v in given.items() if v != GenerateSpec.model_fields[k].default]
            if bad:
                raise ValueError(f"{bad} only apply with do_sample: true (greedy otherwise)")
        return self

    @property
    def identity(self) -> dict[str, Any]:
        """What shapes the generated tokens (hashed into the cache id)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "stop_at_eos": self.stop_at_eos,
        }
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return out


class JobSpec(_Model):
    """A cache job: which teacher, which data, what to keep, and how to split the work.

    With ``generate`` the dataset's rows are prompts the teacher continues first
    (:class:`GenerateSpec`)."""

    name: str = Field("kdcache-job", max_length=200)
    teacher: TeacherSpec
    dataset: DatasetSpec
    outputs: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}))
    batch_size: int = Field(8, ge=1, le=65536)
    rows_per_shard: int = Field(256, ge=1, le=1 << 20)
    generate: GenerateSpec | None = Field(
        None, description="sequence-level KD: the teacher continues each row first"
    )


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts) or "spec"


def _did_you_mean(model: Any, loc: tuple[Any, ...]) -> str:
    """For an unknown key at ``loc``: " (did you mean 'x'?)" naming the closest known field."""
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return ""
        model = fields[part].annotation
        # an optional section (``GenerateSpec | None``): its model's fields
        model = next((a for a in typing.get_args(model) if hasattr(a, "model_fields")), model)
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6) if loc else []
    if close:
        return f"unknown field {loc[-1]!r}; did you mean {close[0]!r}?"
    return f"unknown field {loc[-1]!r}; known fields: {', '.join(known)}" if known else ""


def problems_from_validation(
    err: ValidationError, prefix: str = "", model: Any = None
) -> list[Problem]:
    """Turn pydantic's errors into :class:`Problem` s naming dotted fields (``model``: the
    validated class, whose field names are suggested for unknown keys)."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("str", "list[int]", "int"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _did_you_mean(model or JobSpec, loc) or msg
        field = _field_path(loc)
        out.append(Problem(f"{prefix}{field}" if prefix else field, msg))
    return out


def _surrogates(data: Any, path: str = "") -> list[Problem]:
    """Strings holding lone UTF-16 surrogates (``"\\ud800"`` in JSON): no file has such a name,
    and no database or log can store them."""
    if isinstance(data, str):
        if any(0xD800 <= ord(c) <= 0xDFFF for c in data):
            return [Problem(path or "spec", "holds a lone surrogate (not valid Unicode text)")]
        return []
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _surrogates(v, f"{path}.{k}" if path else k)]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in _surrogates(v, f"{path}.{i}")]
    return []


def parse_spec(data: Any) -> JobSpec:
    """Validate a decoded spec (a dict); raise :class:`SpecError` with every problem found."""
    if isinstance(data, JobSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError([Problem("spec", f"must be a mapping, got {type(data).__name__}")])
    bad_text = _surrogates(data)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        seen = {p.field for p in bad_text}
        more = [p for p in problems_from_validation(err) if p.field not in seen]
        raise SpecError([*bad_text, *more]) from None
    if bad_text:
        raise SpecError(bad_text)
    return spec


def load_spec(path: str | Path) -> JobSpec:
    """Read a job spec from a YAML or JSON file; relative paths in it stay as written."""
    return parse_spec(read_spec_file(path))


def read_spec_file(path: str | Path) -> Any:
    """The decoded content of a YAML or JSON spec file (not yet validated)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise SpecError([Problem("spec", f"cannot read {p}: {err.strerror or err}")]) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise SpecError([Problem("spec", f"{p} is not valid YAML/JSON: {err}")]) from None
    return data
