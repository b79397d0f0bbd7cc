"""Turn a submitted job body into a resolved plan, or a 422 naming every bad field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdcache.core.errors import Problem, SpecError, Unprocessable
from kdcache.core.resolve import JobPlan, resolve_job
from kdcache.core.spec import JobSpec, parse_spec

__all__ = ["plan_submission"]


def _jsonl_unsupported() -> Unprocessable:
    return Unprocessable(
        "jsonl datasets cannot be split into shards by the service yet (their row count is "
        "only known after tokenising): run the job embedded with 'kdcache run', or tokenise "
        "it into a tokens .npy and submit that",
        code="unsupported",
        field="dataset.jsonl",
    )


def _check_module(spec: JobSpec, allowed: Callable[[str], bool] | None) -> None:
    """A ``module:`` teacher runs arbitrary code on every worker: only allowlisted modules."""
    if spec.teacher.module is None:
        return
    module = spec.teacher.module.split(":", 1)[0]
    if allowed is None or not allowed(module):
        raise SpecError(
            [
                Problem(
                    "teacher.module",
                    f"module {module!r} is not on the service's allowlist of teacher modules "
                    "(KDCACHE_TEACHER_MODULES, empty by default): use an 'hf' teacher, or ask "
                    "the operator to allow the module",
                )
            ]
        )


def plan_submission(body: Any, allowed_module: Callable[[str], bool] | None = None) -> JobPlan:
    """Validate ``body`` as a JobSpec and resolve it against the service host's files.

    Relative paths are taken from the service's working directory; ``module:`` teachers must
    pass ``allowed_module``. Raises :class:`SpecError` (422 ``invalid_spec``) listing every
    problem, or 422 ``unsupported`` for jsonl datasets.
    """
    spec = parse_spec(body)
    _check_module(spec, allowed_module)
    if spec.dataset.jsonl is not None:
        raise _jsonl_unsupported()
    try:
        plan = resolve_job(spec)
    except SpecError:
        raise
    except (OSError, RuntimeError, ValueError) as err:
        # e.g. "~nosuchuser/x" (no home directory to expand) or an unencodable path.
        raise SpecError([Problem("spec", f"cannot resolve the spec's paths: {err}")]) from None
    if plan.num_rows is None or plan.num_shards is None:
        raise _jsonl_unsupported()
    return plan
