"""The resolved plan a lease carries, so a worker checks it instead of resolving the job again.

The service resolves a job once, at submit: it hashes every byte of the teacher's weights and of
the dataset (minutes for a 140 GB teacher on a host that has not hashed it before), reads the
teacher's config and the dataset's shape. It keeps the result with the job and sends it with
every lease as a :class:`~kdcache.core.wire.LeasePlan`, together with the version of each file
it hashed (absolute path -> size, mtime and ctime in ns).

A worker ``stat``s the same paths. All versions equal (the same files, e.g. on shared storage)
and it takes the plan as it is, reading no weights; any difference (a copy on the worker's own
disk, a file changed since the submit, a missing file) and it resolves the job itself, which
refuses the lease when that gives another cache id than the service's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kdcache.core import fingerprint as fp
from kdcache.core.resolve import JobPlan, TeacherInfo
from kdcache.core.spec import JobSpec
from kdcache.core.wire import LeasePlan

__all__ = ["file_versions", "plan_of_lease", "to_lease_plan"]

log = logging.getLogger(__name__)


def _version(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _fingerprinted_files(spec: JobSpec) -> list[Path]:
    """Every file whose bytes the fingerprints of ``spec`` (absolute paths) hash."""
    files: list[Path] = []
    if spec.teacher.hf is not None:
        files += fp.teacher_files(spec.teacher.hf)
    elif spec.teacher.module is not None and (src := fp.module_file(spec.teacher.module)):
        files.append(src)
    data = spec.dataset.tokens or spec.dataset.documents
    if data is not None:
        files += fp.dataset_files(data)
    if spec.dataset.tokenizer is not None:
        files += fp.tokenizer_files(spec.dataset.tokenizer)
    return files


def file_versions(spec: JobSpec) -> dict[str, tuple[int, int, int]]:
    """Absolute path -> (size, mtime_ns, ctime_ns) of each file ``spec``'s fingerprints hash."""
    return {str(p.absolute()): _version(p) for p in _fingerprinted_files(spec)}


def to_lease_plan(plan: JobPlan) -> LeasePlan:
    """What a lease carries of ``plan`` (a resolved plan: its spec holds absolute paths)."""
    info = plan.teacher
    return LeasePlan(
        teacher_fingerprint=plan.teacher_fingerprint,
        dataset_fingerprint=plan.dataset_fingerprint,
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
        num_rows=plan.num_rows,
        seq_len=plan.seq_len,
        vocab_size=info.vocab_size,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        max_positions=info.max_positions,
        layer_map={str(s): t for s, t in plan.layer_map.items()},
        files=file_versions(plan.spec),
    )


def _first_difference(spec: JobSpec, want: dict[str, tuple[int, int, int]]) -> str | None:
    """Why this host's files are not the plan's (None when they are)."""
    try:
        here = file_versions(spec)
    except OSError as err:
        return f"cannot stat {err.filename}: {err.strerror}"
    for path in sorted(set(here) | set(want)):
        if path not in want:
            return f"{path} is here, not in the plan"
        if path not in here:
            return f"{path} is in the plan, not here"
        if here[path] != tuple(want[path]):
            return f"{path} has another size or time here"
    return None


def plan_of_lease(spec: JobSpec, lease_plan: LeasePlan) -> JobPlan | None:
    """The job's plan from a lease, or None when this host's files differ from the service's.

    ``spec`` is the lease's spec (a worker may have replaced its device). Reads no file's
    contents: only ``stat`` of the files the fingerprints hashed.
    """
    why = _first_difference(spec, lease_plan.files)
    if why is not None:
        log.info("the job's files differ from the service's (%s): resolving it here", why)
        return None
    p = lease_plan
    return JobPlan(
        spec=spec,
        teacher=TeacherInfo(
            vocab_size=p.vocab_size,
            num_layers=p.num_layers,
            hidden_size=p.hidden_size,
            max_positions=p.max_positions,
        ),
        num_rows=p.num_rows,
        seq_len=p.seq_len,
        teacher_fingerprint=p.teacher_fingerprint,
        dataset_fingerprint=p.dataset_fingerprint,
        tokenizer_fingerprint=p.tokenizer_fingerprint,
        layer_map={int(s): t for s, t in p.layer_map.items()},
    )
