"""``kdcache plan JOB.yaml``: predicted bytes per array, total, tokens and teacher-pass time."""

from __future__ import annotations

import argparse
import json

from kdcache.cli.cache_commands import _human_bytes

__all__ = ["add_command"]

EXIT_OK = 0


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cmd_plan(args: argparse.Namespace) -> int:
    from kdcache.core.errors import Problem, SpecError
    from kdcache.core.resolve import load_job
    from kdcache.worker.plan import plan_job
    from kdcache.worker.runner import prepare_job

    if args.rows is not None and args.rows < 1:
        raise SpecError([Problem("--rows", f"must be >= 1; got {args.rows}")])
    job_plan = load_job(args.job)
    job = prepare_job(job_plan.spec, plan=job_plan)
    plan = plan_job(job_plan.spec, rows=args.rows, job=job)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return EXIT_OK
    print(f"job        {plan.name or '(unnamed)'}  (cache {plan.cache_id})")
    print(
        f"dataset    {plan.num_rows:,} rows x {plan.seq_len} tokens = {plan.tokens:,} tokens, "
        f"{plan.num_shards} shard(s)"
    )
    print(
        f"sampled    {plan.sample_rows} rows through the teacher on {plan.device} in "
        f"{plan.sample_seconds:.2f} s; nothing was written"
    )
    print("predicted arrays (bytes on disk, as `kdcache inspect` counts them)")
    for name, size in plan.arrays.items():
        print(f"  {name:<18} {_human_bytes(size):>11}  {size / plan.tokens:9.1f} B/token")
    print(f"total      {_human_bytes(plan.total_bytes)}, {plan.bytes_per_token:,.1f} bytes/token")
    rate = plan.tokens / plan.teacher_seconds if plan.teacher_seconds > 0 else float("inf")
    print(
        f"teacher    ~{_duration(plan.teacher_seconds)} for the whole pass on {plan.device} "
        f"({rate:,.0f} tokens/s in one process; model loading not included)"
    )
    return EXIT_OK


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plan`` to the ``kdcache`` parser."""
    p = sub.add_parser(
        "plan",
        help="predict a job's bytes per array, total, tokens and teacher time; writes nothing",
        description=(
            "Run the job's teacher on a few rows spread over the dataset and predict, before "
            "anything is written: the bytes of each array, the total, the tokens and the "
            "teacher-pass time."
        ),
    )
    p.add_argument("job", help="job spec (YAML or JSON)")
    p.add_argument(
        "--rows", type=int, help="rows to run (default: two batches, at least 16, one shard max)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plan)
