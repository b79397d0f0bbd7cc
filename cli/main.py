"""``kdcache`` sub-commands. Exit codes: 0 ok, 1 the work failed, 2 bad input (one line each),
130 interrupted (Ctrl-C), 141 output pipe closed (``kdcache inspect ... | head``)."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from kdcache.core.errors import KDCacheError, SpecError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141

_DESCRIPTION = """\
Teacher-activation cache for knowledge distillation: run a teacher once over a dataset, store
its top-k log-probabilities (with the exact log-normaliser) and hidden states, and stream them
into student training.

exit status: 0 ok, 1 the work failed, 2 bad input, 130 interrupted."""

_EPILOG = """\
environment: KDCACHE_SERVER and KDCACHE_TOKEN (client commands), KDCACHE_ROOT and
KDCACHE_*_TOKEN (serve). Run 'kdcache COMMAND --help' for a command's options."""


def _cmd_run(args: argparse.Namespace) -> int:
    from kdcache.core.resolve import load_job
    from kdcache.worker.runner import completed_cache, prepare_job, run_job

    plan = load_job(args.job)
    done = completed_cache(plan, args.root)
    if done is not None:  # nothing to compute: do not load the teacher at all
        logging.getLogger("kdcache").info("cache %s is complete", plan.cache_id)
        print(done)
        return EXIT_OK
    job = prepare_job(plan.spec, plan=plan)
    url = run_job(plan.spec, args.root, job=job)
    print(url)
    return EXIT_OK


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from kdcache.client.cache import open_reader
    from kdcache.core.inspect import inspect_cache

    if _is_root(args.cache):
        from kdcache.cli.cache_commands import print_cache_list
        from kdcache.core.catalog import describe_cache, find_caches

        urls = find_caches(args.cache)
        if not args.json:
            print(f"{args.cache} is a storage root holding {len(urls)} cache(s):")
        print_cache_list([describe_cache(u) for u in urls], args.json)
        if not args.json and urls:
            print(f"inspect one with: kdcache inspect {urls[0]}")
        return EXIT_OK
    info = inspect_cache(args.cache, open_reader(args.cache))
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    m = info["manifest"]
    print(f"cache      {m['cache_id']}  ({m['name']})")
    print(f"location   {info['url']}")
    print(f"rows       {m['num_rows']} x {m['seq_len']} tokens = {info['tokens']} tokens")
    print(
        f"teacher    vocab {m['vocab_size']}, top-k {m['topk']}, temperatures {m['temperatures']}"
    )
    print(f"layers     {m['hidden_layers']} ({m['hidden_dtype']}), map {m['layer_map']}")
    done, total = info["shards_done"], info["shards_total"]
    state = "complete" if done == total else "incomplete"
    print(f"shards     {done}/{total} complete ({state}), {info['rows_done']} rows done")
    print("arrays")
    for a in info["arrays"]:
        dtype = (
            a["dtype"]
            if a["dtype"] == a["stored_dtype"]
            else f"{a['dtype']} (as {a['stored_dtype']})"
        )
        size = _human_bytes(a["bytes"]) if a["bytes"] is not None else "(size unknown)"
        print(f"  {a['name']:<18} {str(tuple(a['shape'])):<20} {dtype:<22} {size}")
    if info["bytes"] is not None and info["bytes_per_token"] is not None:
        bpt = info["bytes_per_token"]
        print(
            f"on disk    {_human_bytes(info['bytes'])}, {bpt:,.1f} bytes/token (of completed rows)"
        )
    return EXIT_OK


def _is_root(path: str) -> bool:
    """A local or s3:// path that is not itself a cache but holds ``caches/``."""
    if path.startswith(("http://", "https://")):
        return False
    from kdcache.core.catalog import find_caches, is_cache

    try:
        return not is_cache(path) and bool(find_caches(path))
    except OSError:
        return False


def _cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kdcache.client.cache import open_reader

    reader = open_reader(args.cache)
    shards = sorted(reader.completed())
    checks = [
        reader.check_shard(s)
        for s in tqdm(shards, desc="verify", unit="shard", disable=None, leave=False)
    ]
    bad = [c for c in checks if not c.ok]
    for c in bad:
        print(f"shard {c.shard}: CORRUPT: {'; '.join(c.problems)}")
    total = reader.manifest.num_shards
    print(f"{len(checks) - len(bad)}/{len(checks)} completed shards verified ok ({total} in all)")
    return EXIT_FAILED if bad else EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from kdcache.core.format import FORMAT_VERSION

    try:
        v = version("kdcache")
    except PackageNotFoundError:
        v = "unknown"
    return f"kdcache {v} (cache format {FORMAT_VERSION})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdcache",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: all)")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="embedded: run a whole job in this process")
    run.add_argument("job", help="job spec (YAML or JSON)")
    run.add_argument("--root", required=True, help="storage root (directory or s3://...)")
    run.set_defaults(func=_cmd_run)

    ins = sub.add_parser("inspect", help="rows, tokens, arrays, bytes/token, completeness")
    ins.add_argument("cache", help="cache directory or URL")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=_cmd_inspect)

    ver = sub.add_parser("verify", help="recompute the checksums of every completed shard")
    ver.add_argument("cache", help="cache directory or URL")
    ver.set_defaults(func=_cmd_verify)
    from kdcache.cli.cache_commands import add_commands

    add_commands(sub)
    from kdcache.cli.plan_command import add_command as add_plan

    add_plan(sub)
    _add_service_commands(sub)
    for command in sub.choices.values():  # -v after the sub-command too; help as plain text
        command.description = _plain(command.description)
        command.formatter_class = argparse.RawDescriptionHelpFormatter  # keep examples' lines
        command.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
        )
    return p


_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc):`~?([^`]+)`")


def _plain(text: str | None) -> str | None:
    """A docstring as help text: no reST roles or ``literal`` markup."""
    if text is None:
        return None
    text = re.sub(r"(?m)^[ \t]*::[ \t]*\n", "", text)  # a literal block's lone marker
    return _ROLE.sub(r"\1", text).replace("``", "'").replace("::\n", ":\n")


def _add_service_commands(sub: argparse._SubParsersAction) -> None:
    try:
        from kdcache.cli.service_commands import add_commands
    except ImportError:
        return
    add_commands(sub)
    from kdcache.cli.slurm_commands import add_commands as add_slurm

    add_slurm(sub)


def _unknown_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """ "did you mean" for a mistyped sub-command (argparse only lists every choice)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in sub.choices:
        return None
    close = difflib.get_close_matches(word, list(sub.choices), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; commands: {', '.join(sub.choices)}"
    return f"error: unknown command '{word}'{hint}"


def _setup_logging(verbose: int) -> None:
    """kdcache's own INFO lines by default; other libraries' (httpx requests...) only at -vv."""
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kdcache").setLevel(logging.DEBUG if verbose else logging.INFO)


def _http_hint(err: BaseException) -> str | None:
    """A one-line explanation of an HTTP failure that says what to set, or None."""
    status = getattr(err, "status", None)
    response = getattr(err, "response", None)
    status = status or getattr(response, "status_code", None)
    if status == 401:
        return "the service needs a token: set KDCACHE_TOKEN (or pass --token)"
    if status == 403:
        return "the service refused the token: set KDCACHE_TOKEN to a token of the right class"
    if type(err).__name__ in ("ConnectError", "ClientConnectorError", "Unreachable"):
        return f"cannot reach the service ({err}); is 'kdcache serve' running at KDCACHE_SERVER?"
    return None


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SpecError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KDCacheError as err:
        print(f"error: {err}", file=sys.stderr)
        hint = _http_hint(err)
        if hint is not None:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # a full disk, a lost mount: one line, not a traceback
        if isinstance(err, BrokenPipeError):  # main() ends a closed pipe quietly
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {_http_hint(err) or (err.strerror or str(err)) + where}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:
        hint = _http_hint(err)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _parser()
        problem = _unknown_command(parser, argv)
        if problem:
            print(problem, file=sys.stderr)
            return EXIT_USAGE
        args = parser.parse_args(argv)
        _setup_logging(args.verbose)
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`kdcache inspect ... | head`): no traceback, and none at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
