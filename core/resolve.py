"""Check a job spec against the files it names and work out everything derived from it.

:func:`resolve_job` reads only small things (a teacher's ``config.json``, a ``.npy`` header) and
imports no torch, so the service can call it at submit time. What only a loaded teacher can tell
(the vocabulary of a ``module`` teacher, the rows of a tokenised ``jsonl`` file) is filled in by
the worker with :meth:`JobPlan.complete`, which checks the same rules again.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.core import fingerprint as fp
from kdcache.core.documents import check_head, has_chat_template
from kdcache.core.errors import Problem, SpecError
from kdcache.core.format import FORMAT_VERSION
from kdcache.core.hidden_codec import parse_hidden_codec
from kdcache.core.spec import DatasetSpec, JobSpec, parse_spec, read_spec_file

__all__ = [
    "JobPlan",
    "absolute_paths",
    "TeacherInfo",
    "load_job",
    "plan_from_data",
    "read_teacher_config",
    "resolve_job",
    "uniform_layers",
]


@dataclass(frozen=True)
class TeacherInfo:
    """What the teacher's config says: None where it does not say (module teachers)."""

    vocab_size: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    max_positions: int | None = None


def _first(cfg: dict[str, Any], *keys: str) -> int | None:
    for source in (cfg, cfg.get("text_config") or {}):
        for k in keys:
            v = source.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def read_teacher_config(hf_dir: str | Path) -> TeacherInfo:
    """Read vocab size, depth, width and context length from a HF ``config.json``."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    if not isinstance(cfg, dict) or not isinstance(cfg.get("text_config") or {}, dict):
        raise ValueError("config.json must hold a JSON object (a Hugging Face model config)")
    return TeacherInfo(
        vocab_size=_first(cfg, "vocab_size", "padded_vocab_size"),
        num_layers=_first(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=_first(cfg, "hidden_size", "n_embd", "d_model"),
        max_positions=_first(cfg, "max_position_embeddings", "n_positions", "seq_length"),
    )


def uniform_layers(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student block i (1..S) <- teacher block round(i * L / S): evenly spaced, ends aligned."""
    return {
        i: int(round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)
    }


@dataclass(frozen=True)
class JobPlan:
    """A validated spec (with absolute paths) and everything derived from it."""

    spec: JobSpec
    teacher: TeacherInfo
    num_rows: int | None
    seq_len: int
    teacher_fingerprint: str
    dataset_fingerprint: str
    tokenizer_fingerprint: str | None
    layer_map: dict[int, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        """Teacher hidden_states indices to store, ascending."""
        h = self.spec.outputs.hidden_layers
        return sorted(set(self.layer_map.values())) if isinstance(h, str) else sorted(h)

    @property
    def identity(self) -> dict[str, Any]:
        """What the cache id hashes: the numbers' causes, never file locations."""
        out = self.spec.outputs
        identity: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "teacher": self.teacher_fingerprint,
            "teacher_dtype": self.spec.teacher.dtype,
            "dataset": self.dataset_fingerprint,
            "tokenizer": self.tokenizer_fingerprint,
            "topk": out.topk,
            "temperatures": out.temperatures,
            "hidden_layers": out.hidden_layers,
            "hidden_dtype": out.hidden_dtype,
            "rows_per_shard": self.spec.rows_per_shard,
            "loss_mask": True,
        }
        # Options at their defaults stay out, so caches made before they existed keep their ids.
        if out.topk_codec != "fp16":
            identity.update(topk_codec=out.topk_codec)
        if out.hidden_codec != "exact":
            identity.update(hidden_codec=out.hidden_codec)
        if out.sample_draws:
            identity.update(sample_draws=out.sample_draws, sample_seed=out.sample_seed)
            if not out.sample_logprobs:
                identity.update(sample_logprobs=False)
        if self.spec.generate is not None:
            identity.update(generate=self.spec.generate.identity)
        return identity

    @property
    def cache_id(self) -> str:
        return fp.cache_id(self.identity)

    @property
    def num_shards(self) -> int | None:
        if self.num_rows is None:
            return None
        return -(-self.num_rows // self.spec.rows_per_shard)

    def complete(
        self, *, teacher: TeacherInfo | None = None, num_rows: int | None = None
    ) -> JobPlan:
        """Fill in what a loaded teacher / tokenised dataset tells, and check the rules again."""
        info = self.teacher
        if teacher is not None:
            info = TeacherInfo(
                vocab_size=info.vocab_size or teacher.vocab_size,
                num_layers=info.num_layers or teacher.num_layers,
                hidden_size=info.hidden_size or teacher.hidden_size,
                max_positions=info.max_positions or teacher.max_positions,
            )
        plan = replace(self, teacher=info, num_rows=num_rows or self.num_rows)
        problems = _check_outputs(plan.spec, info, plan.seq_len)
        if problems:
            raise SpecError(problems)
        return replace(plan, layer_map=_layer_map(plan.spec, info))


def _abs(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if base is not None and (base / p).exists():
        return (base / p).resolve()
    return p.resolve()


_PATH_FIELDS = {"teacher": ("hf",), "dataset": ("tokens", "jsonl", "tokenizer", "hf")}


def absolute_paths(spec: JobSpec, base_dir: str | Path | None) -> JobSpec:
    """``spec`` with every local path made absolute the way :func:`resolve_job` does it (from
    ``base_dir`` when the file is there, else the working directory); URLs stay as written.

    ``kdcache run`` and ``kdcache submit`` both read spec files through this.
    """
    base = Path(base_dir) if base_dir is not None else None
    update: dict[str, Any] = {}
    for part, names in _PATH_FIELDS.items():
        model = getattr(spec, part)
        fixed = {
            n: str(_abs(v, base))
            for n in names
            if isinstance(v := getattr(model, n, None), str) and "://" not in v
        }
        if fixed:
            update[part] = model.model_copy(update=fixed)
    return spec.model_copy(update=update) if update else spec


def _layer_map(spec: JobSpec, info: TeacherInfo) -> dict[int, int]:
    s = spec.outputs.uniform_student_layers()
    if s is not None and info.num_layers:
        return uniform_layers(s, info.num_layers)
    return {}


def _check_outputs(spec: JobSpec, info: TeacherInfo, seq_len: int) -> list[Problem]:
    out, problems = spec.outputs, []
    if info.vocab_size is not None and out.topk > info.vocab_size:
        problems.append(
            Problem("outputs.topk", f"{out.topk} > the teacher's vocab size {info.vocab_size}")
        )
    if info.num_layers is not None:
        s = out.uniform_student_layers()
        if s is not None and s > info.num_layers:
            problems.append(
                Problem(
                    "outputs.hidden_layers",
                    f"uniform:{s} asks for more layers than the teacher's {info.num_layers}",
                )
            )
        if isinstance(out.hidden_layers, list):
            bad = [i for i in out.hidden_layers if i > info.num_layers]
            if bad:
                problems.append(
                    Problem(
                        "outputs.hidden_layers",
                        f"layers {bad} out of range: the teacher has hidden_states "
                        f"0..{info.num_layers}",
                    )
                )
    codec = parse_hidden_codec(out.hidden_codec)
    if codec.kind == "pca" and info.hidden_size is not None and codec.rank > info.hidden_size:
        problems.append(
            Problem(
                "outputs.hidden_codec",
                f"{codec.name}: R = {codec.rank} exceeds the teacher's hidden width "
                f"{info.hidden_size}",
            )
        )
    if info.max_positions is not None and seq_len > info.max_positions:
        gen = spec.generate
        problems.append(
            Problem(
                "generate.max_new_tokens",
                f"prompts of {seq_len - gen.max_new_tokens} tokens + {gen.max_new_tokens} new "
                f"tokens exceed the teacher's window of {info.max_positions}",
            )
            if gen is not None
            else Problem(
                "dataset",
                f"rows of {seq_len} tokens exceed the teacher's window of {info.max_positions}",
            )
        )
    return problems


def _check_generate(spec: JobSpec) -> list[Problem]:
    """Prompts must be plain rows; a conversation has no single place to continue from."""
    if spec.dataset.messages_field is not None:
        return [
            Problem(
                "generate",
                "prompts must be plain rows (dataset.tokens, or text_field documents); "
                "conversations (dataset.messages_field) are not supported as prompts",
            )
        ]
    return []


def _resolve_teacher(spec: JobSpec, base: Path | None, problems: list[Problem]):
    t = spec.teacher
    if t.hf is not None:
        path = _abs(t.hf, base)
        if not path.is_dir():
            problems.append(Problem("teacher.hf", f"no such directory: {path}"))
            return None, TeacherInfo(), None
        if not (path / "config.json").is_file():
            problems.append(Problem("teacher.hf", f"{path} has no config.json"))
            return None, TeacherInfo(), None
        try:
            info = read_teacher_config(path)
        except (OSError, ValueError) as err:
            problems.append(Problem("teacher.hf", f"unreadable config.json in {path}: {err}"))
            return None, TeacherInfo(), None
        if info.vocab_size is None:
            problems.append(Problem("teacher.hf", f"{path}/config.json has no vocab_size"))
        if not any(p.suffix in fp.WEIGHT_SUFFIXES for p in path.rglob("*")):
            problems.append(Problem("teacher.hf", f"{path} holds no weight files"))
        return str(path), info, fp.teacher_fingerprint(hf_dir=str(path))
    assert t.module is not None  # the spec model guarantees one source
    mod = t.module.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        found = None
    if found is None:
        problems.append(Problem("teacher.module", f"module {mod!r} cannot be found"))
        return None, TeacherInfo(), None
    return None, TeacherInfo(), fp.teacher_fingerprint(module=t.module)


def _resolve_tokens(path: Path, problems: list[Problem]) -> tuple[int | None, int | None]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        problems.append(Problem("dataset.tokens", f"{path} is not a readable .npy array: {err}"))
        return None, None
    if arr.ndim != 2:
        problems.append(
            Problem("dataset.tokens", f"must be a 2-D (N, T) array, got shape {arr.shape}")
        )
        return None, None
    if not np.issubdtype(arr.dtype, np.integer):
        problems.append(Problem("dataset.tokens", f"must hold integers, got dtype {arr.dtype}"))
    n, t = int(arr.shape[0]), int(arr.shape[1])
    if n < 1:
        problems.append(Problem("dataset.tokens", "holds no rows"))
    if t < 2:
        problems.append(Problem("dataset.tokens", f"rows must have >= 2 tokens, got {t}"))
    return n, t


def _data_problem(ds: DatasetSpec, path: Path) -> Problem | None:
    key = "tokens" if ds.tokens else "jsonl" if ds.jsonl else "hf"
    if ds.hf is not None:
        return (
            None if path.exists() else Problem("dataset.hf", f"no such file or directory: {path}")
        )
    return None if path.is_file() else Problem(f"dataset.{key}", f"no such file: {path}")


def _document_params(ds: DatasetSpec, tok_fp: str | None) -> dict[str, Any]:
    """What turns documents into rows, hashed with the data's bytes (chat template: in tok)."""
    params: dict[str, Any] = {
        "text_field": ds.field,
        "seq_len": ds.seq_len,
        "pack": ds.pack,
        "tok": tok_fp,
    }
    if ds.hf is not None:
        params.update(kind="hf", split=ds.split or "train")
    if ds.messages_field is not None:
        params.update(messages_field=ds.messages_field)
        params.pop("text_field")
    if ds.max_rows is not None:
        params.update(max_rows=ds.max_rows)
    return params


def resolve_job(spec: JobSpec, base_dir: str | Path | None = None) -> JobPlan:
    """Check ``spec`` against the files it names; raise :class:`SpecError` listing every problem.

    Relative paths are taken from ``base_dir`` (the spec file's folder) when they exist there,
    else from the working directory; the plan's spec holds absolute paths. Document datasets
    (jsonl, hf) get their first rows checked (:func:`kdcache.core.documents.check_head`); their
    row count is only known once tokenised.
    """
    base = Path(base_dir) if base_dir is not None else None
    problems: list[Problem] = []
    hf_dir, info, teacher_fp = _resolve_teacher(spec, base, problems)
    ds = spec.dataset
    num_rows: int | None = None
    seq_len = ds.seq_len or 0
    data_path = _abs(ds.tokens or ds.documents or "", base)
    tok_dir: str | None = None
    missing = _data_problem(ds, data_path)
    if missing is not None:
        problems.append(missing)
    elif ds.tokens is not None:
        n, t = _resolve_tokens(data_path, problems)
        num_rows, seq_len = n, t or 0
    if ds.tokenizer is not None:
        tok_dir = str(_abs(ds.tokenizer, base))
        if not Path(tok_dir).is_dir():
            problems.append(Problem("dataset.tokenizer", f"no such directory: {tok_dir}"))
            tok_dir = None
    elif hf_dir is not None and fp.tokenizer_fingerprint(hf_dir) is not None:
        tok_dir = hf_dir
    if ds.documents is not None and tok_dir is None and ds.tokenizer is None and not problems:
        kind = "jsonl" if ds.jsonl else "hf"
        problems.append(
            Problem("dataset.tokenizer", f"{kind} needs a tokenizer: the teacher has none")
        )
    if ds.messages_field is not None and tok_dir is not None and not has_chat_template(tok_dir):
        problems.append(
            Problem(
                "dataset.messages_field",
                f"the tokenizer {tok_dir} has no chat template to render conversations with "
                "(chat_template in tokenizer_config.json, or chat_template.jinja)",
            )
        )
    if ds.jsonl is not None and missing is None:
        problems += check_head(data_path, ds.field, ds.messages_field)
    if spec.generate is not None:
        problems += _check_generate(spec)
        seq_len += spec.generate.max_new_tokens if seq_len else 0
    problems += _check_outputs(spec, info, seq_len)
    if problems:
        raise SpecError(problems)
    tok_fp = fp.tokenizer_fingerprint(tok_dir)
    params = _document_params(ds, tok_fp) if ds.documents is not None else None
    key = "tokens" if ds.tokens else "jsonl" if ds.jsonl else "hf"
    abs_spec = spec.model_copy(
        update={
            "teacher": spec.teacher.model_copy(update={"hf": hf_dir}) if hf_dir else spec.teacher,
            "dataset": ds.model_copy(update={key: str(data_path), "tokenizer": tok_dir}),
        }
    )
    return JobPlan(
        spec=abs_spec,
        teacher=info,
        num_rows=num_rows,
        seq_len=seq_len,
        teacher_fingerprint=teacher_fp or "",
        dataset_fingerprint=fp.dataset_fingerprint(data_path, params),
        tokenizer_fingerprint=tok_fp,
        layer_map=_layer_map(spec, info),
    )


def _raw_path_problems(data: Any, base: Path | None) -> list[Problem]:
    """Missing files named by a spec that failed structural checks, so all show at once."""
    out: list[Problem] = []
    if not isinstance(data, dict):
        return out
    teacher, dataset = data.get("teacher"), data.get("dataset")
    if isinstance(teacher, dict) and isinstance(teacher.get("hf"), str):
        if not _abs(teacher["hf"], base).is_dir():
            out.append(Problem("teacher.hf", f"no such directory: {_abs(teacher['hf'], base)}"))
    if isinstance(dataset, dict):
        for key in ("tokens", "jsonl"):
            value = dataset.get(key)
            if isinstance(value, str) and not _abs(value, base).is_file():
                out.append(Problem(f"dataset.{key}", f"no such file: {_abs(value, base)}"))
        hf = dataset.get("hf")
        if isinstance(hf, str) and not _abs(hf, base).exists():
            out.append(Problem("dataset.hf", f"no such file or directory: {_abs(hf, base)}"))
    return out


def plan_from_data(data: Any, base_dir: str | Path | None = None) -> JobPlan:
    """Validate a decoded spec and resolve it; every problem found is in one SpecError."""
    base = Path(base_dir) if base_dir is not None else None
    try:
        spec = parse_spec(data)
    except SpecError as err:
        seen = {p.field for p in err.problems}
        extra = [p for p in _raw_path_problems(data, base) if p.field not in seen]
        raise SpecError([*err.problems, *extra]) from None
    return resolve_job(spec, base)


def load_job(path: str | Path) -> JobPlan:
    """Read, validate and resolve a spec file; relative paths are taken from its folder."""
    p = Path(path)
    return plan_from_data(read_spec_file(p), p.absolute().parent)
