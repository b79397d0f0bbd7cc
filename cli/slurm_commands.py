"""``kdcache slurm``: submit a job to the service and an sbatch array of workers for it.

::

    kdcache slurm JOB.yaml --server URL --gpus 8 --partition gpu --time 24:00:00
    kdcache slurm --job JOB_ID --server URL --gpus 4       # more workers for a job already there
    kdcache slurm JOB.yaml --server URL --gpus 8 --dry-run  # print the batch script, submit nothing

The batch script comes from :mod:`kdcache.cli.slurm_script`; ``--template FILE`` renders an
edited copy of it instead. The token for the service comes from ``--token`` or ``KDCACHE_TOKEN``
and reaches the tasks through sbatch's exported environment, never through the script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdcache.cli.service_commands import _client, _service_errors, wait_for_job
from kdcache.cli.slurm_script import SlurmOptions, read_template, render

__all__ = ["add_commands"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_ENDED = ("done", "failed", "cancelled")


def _options(args: argparse.Namespace, server: str, job: dict[str, Any] | None) -> SlurmOptions:
    if job is not None:
        job_id: str | None = str(job["id"])
        label = f"kdcache job {job_id} ({job.get('name', '')}, cache {job.get('cache_id', '?')})"
    elif args.job_id:
        job_id, label = args.job_id, f"kdcache job {args.job_id}"
    else:  # a dry run of a spec: the service names the job when it is submitted
        job_id, label = "<JOB_ID>", f"the job of {Path(args.job or 'JOB').name}"
    log_dir = Path(args.log_dir).absolute()
    return SlurmOptions(
        server=server,
        gpus=args.gpus,
        python=args.python,
        job_id=job_id,
        job_label=label,
        job_name=args.job_name,
        gpu=not args.cpu,
        gpu_type=args.gpu_type,
        gpus_per_task=args.gpus_per_task,
        device=args.device,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        mem=args.mem,
        cpus_per_task=args.cpus_per_task,
        max_running=args.max_running,
        signal_seconds=args.signal_seconds,
        on_term=args.on_term,
        max_idle=args.max_idle,
        root=args.root,
        output=str(log_dir / "%x-%A_%a.log"),
        extra_sbatch=tuple(args.sbatch or ()),
        setup=tuple(args.setup or ()),
    )


def _script(
    args: argparse.Namespace, server: str, job: dict[str, Any] | None, problems: list[str]
) -> str | None:
    """The batch script, or None after printing ``problems`` and all else wrong with the options."""
    options = _options(args, server, job)
    problems = problems + options.problems()
    template = None
    if args.template:
        try:
            template = read_template(args.template)
        except OSError as err:
            problems.append(f"--template: cannot read {args.template}: {err.strerror}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return None
    try:
        return render(options) if template is None else render(options, template)
    except KeyError as err:
        print(f"error: --template: {err.args[0]}", file=sys.stderr)
        return None


def _sbatch(script: str, args: argparse.Namespace, token: str | None) -> str:
    """Submit the script on sbatch's stdin; returns the Slurm job id."""
    env = dict(os.environ)
    if token:  # through the environment: never on a command line or in the script
        env["KDCACHE_TOKEN"] = token
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [args.sbatch_bin, "--parsable"],
        input=script,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if res.returncode != 0:
        raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def _job_for(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    if args.job_id:
        job = dict(client.job(args.job_id))
        print(f"found job {job['id']} for cache {job['cache_id']} ({job['status']})")
        return job
    job = dict(client.submit(args.job))
    verb = "submitted" if job.get("created", True) else "found existing"
    print(f"{verb} job {job['id']} for cache {job['cache_id']} ({job['status']})")
    return job


@_service_errors
def _cmd_slurm(args: argparse.Namespace) -> int:
    problems = []
    if (args.job is None) == (args.job_id is None):
        problems.append("JOB: give a job spec file or --job JOB_ID (one of them)")
    server = (args.server or os.environ.get("KDCACHE_SERVER") or "").rstrip("/")
    if not server:
        problems.append("--server: no server: pass --server URL or set KDCACHE_SERVER")
        server = "http://unset"
    # all that is wrong with the options at once, before touching the service or Slurm
    script = _script(args, server, None, problems)
    if script is None:
        return EXIT_USAGE
    if args.dry_run:
        sys.stdout.write(script)
        return EXIT_OK
    if shutil.which(args.sbatch_bin) is None:
        print(
            f"error: {args.sbatch_bin} not found: run on a Slurm login node, or print the script "
            "with --dry-run",
            file=sys.stderr,
        )
        return EXIT_FAILED
    args.server = server
    token = args.token if args.token is not None else os.environ.get("KDCACHE_TOKEN")
    with _client(args) as client:
        job = _job_for(args, client)
        url = client.cache_url(job["cache_id"])
        if job["status"] in _ENDED:
            print(f"job {job['id']} is {job['status']}: no workers submitted")
            print(url)
            return EXIT_OK if job["status"] == "done" else EXIT_FAILED
        script = _script(args, server, job, [])
        if script is None:
            return EXIT_USAGE
        try:
            slurm_id = _sbatch(script, args, token)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        kind = "GPU" if not args.cpu else "CPU"
        tasks = args.gpus if args.cpu else args.gpus // args.gpus_per_task
        print(
            f"submitted Slurm array {slurm_id}: {tasks} {kind} workers "
            f"(logs: {Path(args.log_dir).absolute()}; `scancel {slurm_id}` stops them, "
            "their shards go back to the queue)"
        )
        if args.wait and not wait_for_job(client, job["id"], args.timeout, args.poll):
            return EXIT_FAILED
    print(url)
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``slurm`` to the ``kdcache`` parser."""
    p = sub.add_parser(
        "slurm",
        help="submit a job and a Slurm array of workers for it (one per GPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", nargs="?", help="job spec (YAML or JSON) to submit to the service")
    p.add_argument("--job", dest="job_id", help="an existing job's id, instead of a spec")
    p.add_argument("--server", help="service URL as the compute nodes reach it ($KDCACHE_SERVER)")
    p.add_argument("--token", help="bearer token (default: $KDCACHE_TOKEN); exported, not written")
    p.add_argument("--gpus", type=int, required=True, help="array tasks: one worker, one GPU each")
    p.add_argument("--cpu", action="store_true", help="CPU workers: no --gres, --device cpu")
    p.add_argument("--gpu-type", help="GPU type for --gres=gpu:TYPE:1 (e.g. a100)")
    p.add_argument(
        "--gpus-per-task",
        type=int,
        default=1,
        help="GPUs of one worker, the teacher split over them (1); tasks = --gpus / this",
    )
    p.add_argument("--device", help="worker --device (default: cuda:0, the task's own GPU)")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--time", help="sbatch --time (e.g. 24:00:00)")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--qos", help="sbatch --qos")
    p.add_argument("--mem", help="sbatch --mem (e.g. 64G)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="sbatch --cpus-per-task (8)")
    p.add_argument("--max-running", type=int, help="at most M tasks at once (--array=0-N%%M)")
    p.add_argument("--job-name", default="kdcache-worker", help="sbatch --job-name")
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="SIGTERM this many seconds before the time limit (--signal=B:TERM@S; 120)",
    )
    p.add_argument(
        "--on-term",
        choices=("release", "finish"),
        default="release",
        help="on SIGTERM, hand the shard back at once (release, default) or finish it first",
    )
    p.add_argument(
        "--max-idle", type=float, default=60.0, help="a worker exits after S idle seconds (60)"
    )
    p.add_argument("--root", help="storage root as the compute nodes mount it (worker --root)")
    p.add_argument("--log-dir", default="kdcache-slurm-logs", help="task logs (%%x-%%A_%%a.log)")
    p.add_argument("--sbatch", action="append", metavar="OPTION", help="more: --sbatch=--qos=x")
    p.add_argument(
        "--setup", action="append", metavar="LINE", help="shell line run before the worker"
    )
    p.add_argument(
        "--python", default=sys.executable, help="Python with kdcache on the compute nodes"
    )
    p.add_argument("--template", help="render this edited copy of the --dry-run script")
    p.add_argument("--sbatch-bin", default="sbatch", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    p.add_argument("--wait", action="store_true", help="show the job's progress until it ends")
    p.add_argument("--timeout", type=float, help="with --wait: give up after S seconds")
    p.add_argument("--poll", type=float, default=1.0, help="with --wait: poll every S seconds")
    p.set_defaults(func=_cmd_slurm)
