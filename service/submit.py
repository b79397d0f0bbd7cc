"""Turn a submitted job body into a resolved plan, or a 422 naming every bad field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdcache.core.errors import Problem, SpecError
from kdcache.core.resolve import JobPlan, resolve_job
from kdcache.core.spec import JobSpec, parse_spec

__all__ = ["plan_submission"]


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
    problem. A document dataset (jsonl, hf) resolves with its rows unknown: the job's first unit
    of work tokenises it (see ``JobStore.submit``).
    """
    spec = parse_spec(body)
    _check_module(spec, allowed_module)
    try:
        plan = resolve_job(spec)
    except SpecError:
        raise
    except (OSError, RuntimeError, ValueError) as err:
        # e.g. "~nosuchuser/x" (no home directory to expand) or an unencodable path.
        raise SpecError([Problem("spec", f"cannot resolve the spec's paths: {err}")]) from None
    return plan
