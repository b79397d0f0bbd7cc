"""The sbatch script of ``kdcache slurm``: an array of ``kdcache worker`` tasks, one per GPU.

The script is rendered from :data:`TEMPLATE` (or a file of the same form) by replacing
``{{ name }}`` placeholders; every other character, bash's ``${VAR}`` included, is kept as it is.
Values that reach a shell command are quoted with :func:`shlex.quote`; values on ``#SBATCH`` lines
may hold no whitespace (sbatch reads those lines itself, not through a shell).

What makes preemption and ``scancel`` lose nothing:

- ``--requeue``: Slurm puts a preempted (or node-failed) task back in the queue;
- ``--signal=B:TERM@S``: SIGTERM to the batch shell S seconds before the time limit;
- ``exec``: the batch shell *is* the worker, so that SIGTERM (and scancel's) reaches it. The
  worker hands its current shard back to the service at once (``--release-on-term``) or finishes
  it first (``on_term="finish"``), then exits. A worker killed before it could do either loses
  only its lease: the service gives the shard to another worker after ``lease_seconds``.

No secret is ever written into the script: the worker token travels as ``KDCACHE_TOKEN`` in the
environment that sbatch exports to the tasks (``--export=ALL``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TEMPLATE", "SlurmOptions", "placeholders", "render"]

TEMPLATE = """\
#!/bin/bash
# kdcache workers for {{ job_label }}: one Slurm array task per worker, each a `kdcache worker`.
# Rendered by `kdcache slurm` (print it with --dry-run; edit it and pass it back with --template).
# The worker token is not in this file: sbatch exports the submitting shell's KDCACHE_TOKEN.
#SBATCH --job-name={{ job_name }}
#SBATCH --array={{ array }}
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={{ cpus_per_task }}
#SBATCH --requeue
#SBATCH --signal=B:TERM@{{ signal_seconds }}
#SBATCH --open-mode=append
#SBATCH --output={{ output }}
#SBATCH --export=ALL
{{ sbatch_options }}
set -euo pipefail
{{ setup }}
echo "kdcache: array task ${SLURM_ARRAY_TASK_ID:-?} (Slurm job ${SLURM_JOB_ID:-?}," \\
    "restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)," \\
    "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" >&2
worker_id="slurm-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}@$(hostname -s)"
# exec: the worker replaces this shell, so Slurm's SIGTERM reaches it (and not just bash).
exec {{ python }} -m kdcache.cli worker --server {{ server }} {{ job_flag }}\\
    --device {{ device }} --max-idle {{ max_idle }} {{ term_flag }}{{ root_flag }}\\
    --worker-id "$worker_id"
"""

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class SlurmOptions:
    """What the array asks of Slurm and what each task runs.

    ``gpus``: GPUs in all, ``gpus_per_task`` of them per array task (one worker each, the
    teacher split over its GPUs when more than one); ``gpu`` False: CPU workers, no ``--gres``.
    """

    server: str
    gpus: int
    python: str
    job_id: str | None = None
    job_label: str = "a kdcache job"
    job_name: str = "kdcache-worker"
    gpu: bool = True
    gpu_type: str | None = None
    gpus_per_task: int = 1
    device: str | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    cpus_per_task: int = 8
    max_running: int | None = None
    signal_seconds: int = 120
    on_term: str = "release"
    max_idle: float = 60.0
    root: str | None = None
    output: str = "kdcache-slurm-logs/%x-%A_%a.log"
    extra_sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = field(default_factory=tuple)

    def problems(self) -> list[str]:
        """Everything wrong with these options, one ``field: message`` each (empty: fine)."""
        out = []
        if self.gpus < 1:
            out.append(f"--gpus: must be at least 1 (one worker per GPU), got {self.gpus}")
        if self.gpus_per_task < 1:
            out.append(f"--gpus-per-task: must be at least 1, got {self.gpus_per_task}")
        elif self.gpus % self.gpus_per_task:
            out.append(
                f"--gpus: {self.gpus} GPUs do not split into tasks of --gpus-per-task "
                f"{self.gpus_per_task}"
            )
        if self.cpus_per_task < 1:
            out.append(f"--cpus-per-task: must be at least 1, got {self.cpus_per_task}")
        if self.max_running is not None and self.max_running < 1:
            out.append(f"--max-running: must be at least 1, got {self.max_running}")
        if not 0 <= self.signal_seconds <= 65535:
            out.append(f"--signal-seconds: must be 0..65535, got {self.signal_seconds}")
        if self.max_idle <= 0:
            out.append(f"--max-idle: must be positive, got {self.max_idle}")
        if self.on_term not in ("release", "finish"):
            out.append(f"--on-term: must be release or finish, got {self.on_term!r}")
        if not re.match(r"^https?://[^\s/]+", self.server):
            out.append(f"--server: must be an http(s):// URL, got {self.server!r}")
        words = {
            "--partition": self.partition,
            "--time": self.time,
            "--account": self.account,
            "--qos": self.qos,
            "--mem": self.mem,
            "--gpu-type": self.gpu_type,
            "--job-name": self.job_name,
            "--log-dir": self.output,
        }
        for flag, value in words.items():
            if value is not None and (not value or re.search(r"\s", value)):
                out.append(f"{flag}: must be one word with no whitespace, got {value!r}")
        for arg in self.extra_sbatch:
            if not arg.startswith("--") or "\n" in arg:
                out.append(f"--sbatch: must be one sbatch option like --qos=high, got {arg!r}")
        for line in self.setup:
            if "\n" in line:
                out.append(f"--setup: one line each, got {line!r}")
        return out

    @property
    def tasks(self) -> int:
        return max(1, self.gpus // max(1, self.gpus_per_task)) if self.gpu else self.gpus

    @property
    def worker_device(self) -> str:
        # Slurm sets CUDA_VISIBLE_DEVICES to the task's GPUs, so they are cuda:0.. inside it.
        if self.device or not self.gpu:
            return self.device or "cpu"
        return ",".join(f"cuda:{i}" for i in range(self.gpus_per_task))

    def values(self) -> dict[str, str]:
        """The placeholder values."""
        last = self.tasks - 1
        array = f"0-{last}" + (f"%{self.max_running}" if self.max_running else "")
        opts = []
        if self.gpu:
            k = self.gpus_per_task
            gres = f"gpu:{self.gpu_type}:{k}" if self.gpu_type else f"gpu:{k}"
            opts.append(f"--gres={gres}")
        for flag, value in (
            ("partition", self.partition),
            ("time", self.time),
            ("account", self.account),
            ("qos", self.qos),
            ("mem", self.mem),
        ):
            if value:
                opts.append(f"--{flag}={value}")
        opts.extend(self.extra_sbatch)
        job_flag = f"--job {shlex.quote(self.job_id)} " if self.job_id else ""
        return {
            "job_label": self.job_label.replace("\n", " "),
            "job_name": self.job_name,
            "array": array,
            "cpus_per_task": str(self.cpus_per_task),
            "signal_seconds": str(self.signal_seconds),
            "output": self.output,
            "sbatch_options": "\n".join(f"#SBATCH {o}" for o in opts),
            "setup": "\n".join(self.setup),
            "python": shlex.quote(self.python),
            "server": shlex.quote(self.server),
            "job_flag": job_flag,
            "device": shlex.quote(self.worker_device),
            "max_idle": f"{self.max_idle:g}",
            "term_flag": "--release-on-term " if self.on_term == "release" else "",
            "root_flag": f"--root {shlex.quote(self.root)} " if self.root else "",
        }


def placeholders(template: str) -> set[str]:
    """The ``{{ name }}`` names a template uses."""
    return set(_PLACEHOLDER.findall(template))


def render(options: SlurmOptions, template: str = TEMPLATE) -> str:
    """The batch script: ``template`` with every placeholder replaced.

    Raises ``KeyError`` naming the placeholders the template uses that no option provides.
    """
    values = options.values()
    unknown = sorted(placeholders(template) - values.keys())
    if unknown:
        raise KeyError(
            f"unknown placeholders {', '.join(unknown)}; known: {', '.join(sorted(values))}"
        )
    lines = []
    for line in template.splitlines(keepends=True):
        sole = _PLACEHOLDER.fullmatch(line.strip())
        if sole and not values[sole.group(1)]:
            continue  # a line holding only an empty value (no extra options) goes
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    text = "".join(lines)
    return text if text.endswith("\n") else text + "\n"


def read_template(path: str) -> str:
    """A template file's text (``--template``)."""
    return Path(path).read_text()
