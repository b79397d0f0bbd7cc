"""``kdcache serve | worker | submit | jobs``: the service, its workers, and its REST client.

The server comes from ``--server`` or ``KDCACHE_SERVER``, the bearer token from ``--token`` or
``KDCACHE_TOKEN``. A service error prints one line ``error: <code>: <message>`` (a rejected spec:
one ``error: <field>: <message>`` line per problem) and exits 2 for a rejected spec, else 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import wraps
from types import FrameType
from typing import Any

from kdcache.core.errors import ServiceError
from kdcache.core.wire import JOB_STATES

__all__ = ["add_commands", "wait_for_job"]

log = logging.getLogger("kdcache.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace], int]


def _service_errors(func: Command) -> Command:
    """Print a service error as one line and turn it into an exit code."""

    @wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ServiceError as err:
            body = err.body if isinstance(err.body, dict) else {}
            message = str((body.get("error") or {}).get("message") or err)
            print(f"error: {err.code or 'http_' + str(err.status)}: {message}", file=sys.stderr)
            if err.status in (401, 403):
                what = "needs" if err.status == 401 else "refused"
                print(
                    f"hint: the service {what} a token: set KDCACHE_TOKEN (or pass --token)",
                    file=sys.stderr,
                )
            return EXIT_USAGE if err.status == 422 else EXIT_FAILED

    return run


def _server(args: argparse.Namespace) -> str:
    server = args.server or os.environ.get("KDCACHE_SERVER")
    if not server:
        print("error: no server: pass --server URL or set KDCACHE_SERVER", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return str(server).rstrip("/")


def _quiet_http(args: argparse.Namespace) -> None:
    """httpx logs every request at INFO: drowns what the command says unless -vv."""
    if args.verbose < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _client(args: argparse.Namespace) -> Any:
    from kdcache.client.rest import CacheClient

    _quiet_http(args)
    return CacheClient(_server(args), token=args.token)


# -- serve ------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from kdcache.service import Settings, create_app

    overrides: dict[str, Any] = {"root": args.root}
    if args.db:
        overrides["db_url"] = args.db
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        for e in err.errors():
            name = "_".join(str(p) for p in e["loc"]).upper() or "settings"
            msg = str(e["msg"]).removeprefix("Value error, ")
            print(f"error: KDCACHE_{name}: {msg}", file=sys.stderr)
        return EXIT_USAGE
    open_classes = [c for c in settings.open_routes() if c != "read"]
    if open_classes and not _is_loopback(args.host):
        tokens = ", ".join(f"KDCACHE_{c.upper()}_TOKEN" for c in open_classes)
        print(
            f"error: refusing to bind {args.host}: {'/'.join(open_classes)} routes are open "
            f"(no token); set {tokens}, or bind 127.0.0.1",
            file=sys.stderr,
        )
        return EXIT_USAGE
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning" if args.quiet else "info",
        access_log=not args.quiet,
    )
    return EXIT_OK


# -- worker -----------------------------------------------------------------------------------


def _install_signals(stop: threading.Event, abort: threading.Event, release: bool) -> None:
    """First SIGTERM/SIGINT: finish the shard, then exit (release it at once with ``release``);
    a second one releases the shard in hand and exits."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if release or stop.is_set():
            abort.set()
            msg = f"{name}: releasing the current shard (if any) and exiting"
        else:
            msg = f"{name}: finishing the current shard, then exiting (again: release it now)"
        stop.set()
        # not from the handler itself: it may interrupt the main thread inside a log write
        threading.Thread(target=log.warning, args=(msg,), daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _cmd_worker(args: argparse.Namespace) -> int:
    from kdcache.worker.lease import run_worker

    _quiet_http(args)
    stop, abort = threading.Event(), threading.Event()
    _install_signals(stop, abort, args.release_on_term)
    token = args.token if args.token is not None else os.environ.get("KDCACHE_TOKEN")
    stats = run_worker(
        _server(args),
        token=token,
        worker_id=args.worker_id,
        device=args.device,
        root_override=args.root,
        job_id=args.job,
        poll_interval=args.poll_interval,
        max_idle=args.max_idle,
        once=args.once,
        stop_event=stop,
        abort_event=abort,
        retry_for=args.retry_for,
    )
    print(
        f"worker done ({stats.exit_reason}): {stats.completed} shards completed, "
        f"{stats.failed} failed, {stats.abandoned} abandoned, {stats.released} released"
    )
    return EXIT_OK


# -- submit / jobs ----------------------------------------------------------------------------


def _rate(value: Any) -> str:
    """tokens/s, or "?" while the service cannot tell yet (null)."""
    return "?" if value is None else f"{float(value):,.0f}"


def _progress_line(job: dict[str, Any]) -> str:
    from kdcache.worker.progress import format_duration

    rows, total = int(job.get("rows_done") or 0), int(job.get("rows_total") or 0)
    pct = f" ({100.0 * rows / total:.1f}%)" if total else ""
    return (
        f"{job.get('name', job['id'])}: {job['status']}, {rows}/{total or '?'} rows{pct}, "
        f"{job.get('shards_done', 0)}/{job.get('shards_total') or '?'} shards, "
        f"{_rate(job.get('tokens_per_s'))} tokens/s, "
        f"ETA {format_duration(job.get('eta_s'))}"
    )


class _Watcher:
    """Shows a job's progress: a live line on a terminal, a line per change (or 30 s) else."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.last: tuple[Any, ...] | None = None
        self.last_t = 0.0

    def __call__(self, job: dict[str, Any]) -> None:
        line = _progress_line(job)
        if self.live:
            sys.stdout.write("\r" + line + "\x1b[K")
            sys.stdout.flush()
            return
        state = (job["status"], job.get("rows_done"), job.get("shards_done"))
        if state != self.last or time.monotonic() - self.last_t > 30.0:
            print(line, flush=True)
            self.last, self.last_t = state, time.monotonic()

    def close(self) -> None:
        if self.live:
            sys.stdout.write("\n")


def wait_for_job(client: Any, job_id: str, timeout: float | None, poll: float = 1.0) -> bool:
    """Show a job's progress until it ends (``submit --wait``, ``slurm --wait``).

    True when it is done; else prints one line, ``error: timeout: ...`` or
    ``error: job_<status>: <the job's error>``, and returns False.
    """
    watcher = _Watcher()
    try:
        job = client.wait(job_id, timeout=timeout, poll=poll, on_progress=watcher)
    except TimeoutError as err:
        print(f"error: timeout: {err}", file=sys.stderr)
        return False
    finally:
        watcher.close()
    if job["status"] != "done":
        message = job.get("error") or "no error message"
        print(f"error: job_{job['status']}: {message}", file=sys.stderr)
        return False
    return True


@_service_errors
def _cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit(args.job)
        verb = "submitted" if job.get("created", True) else "found existing"
        print(f"{verb} job {job['id']} for cache {job['cache_id']} ({job['status']})")
        if args.wait and not wait_for_job(client, job["id"], args.timeout, args.poll):
            return EXIT_FAILED
        print(client.cache_url(job["cache_id"]))
    return EXIT_OK


@_service_errors
def _cmd_jobs(args: argparse.Namespace) -> int:
    from kdcache.worker.progress import format_duration

    with _client(args) as client:
        jobs = client.jobs(args.status)
    head = ("ID", "NAME", "STATUS", "SHARDS", "ROWS", "TOKENS/S", "ETA", "CACHE")
    rows = [
        (
            str(j["id"]),
            str(j.get("name", ""))[:24],
            str(j["status"]),
            f"{j.get('shards_done', 0)}/{j.get('shards_total', '?')}",
            f"{j.get('rows_done', 0)}/{j.get('rows_total', '?')}",
            _rate(j.get("tokens_per_s")),
            format_duration(j.get("eta_s")) if j["status"] in ("pending", "running") else "-",
            str(j.get("cache_id", "")),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


@_service_errors
def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    print(f"job {job['id']}: {job['status']}")
    return EXIT_OK


# -- parsers ----------------------------------------------------------------------------------


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="service URL (default: $KDCACHE_SERVER)")
    p.add_argument("--token", help="bearer token (default: $KDCACHE_TOKEN)")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``, ``worker``, ``submit`` and ``jobs`` to the ``kdcache`` parser."""
    serve = sub.add_parser("serve", help="run the service (REST API, leases, cache serving)")
    serve.add_argument("--root", required=True, help="storage root (directory or s3://...)")
    serve.add_argument("--db", help="database URL (default: SQLite file under the root)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    serve.add_argument("--quiet", action="store_true", help="no access log")
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser("worker", help="lease loop: compute shards for the service")
    _client_flags(worker)
    worker.add_argument(
        "--device",
        help="teacher device, overriding the spec (cuda:N, cpu; cuda:0,cuda:1 splits the teacher)",
    )
    worker.add_argument("--root", help="storage root as mounted here (default: the service's)")
    worker.add_argument("--job", help="only take shards of this job id")
    worker.add_argument("--worker-id", help="name reported to the service (default: host:pid)")
    worker.add_argument("--max-idle", type=float, help="exit after S seconds with nothing to do")
    worker.add_argument("--poll-interval", type=float, default=2.0, help="idle poll (s)")
    worker.add_argument("--once", action="store_true", help="run at most one shard, then exit")
    worker.add_argument(
        "--retry-for",
        type=float,
        help="give up after S seconds without the service (default: wait for it forever)",
    )
    worker.add_argument(
        "--release-on-term",
        action="store_true",
        help="on SIGTERM give the current shard back at once instead of finishing it",
    )
    worker.set_defaults(func=_cmd_worker)

    submit = sub.add_parser("submit", help="submit a job spec to the service")
    submit.add_argument("job", help="job spec (YAML or JSON); relative paths: from its folder")
    _client_flags(submit)
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after S seconds")
    submit.add_argument("--poll", type=float, default=1.0, help="with --wait: poll every S s")
    submit.set_defaults(func=_cmd_submit)

    jobs = sub.add_parser("jobs", help="list the service's jobs")
    _client_flags(jobs)
    jobs.add_argument("--status", choices=JOB_STATES)
    jobs.set_defaults(func=_cmd_jobs)

    cancel = sub.add_parser("cancel", help="cancel a job: no more shards are leased for it")
    cancel.add_argument("job_id", metavar="JOB", help="job id (see 'kdcache jobs')")
    _client_flags(cancel)
    cancel.set_defaults(func=_cmd_cancel)
