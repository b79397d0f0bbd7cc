"""``kdcache`` sub-commands. Exit codes: 0 ok, 1 the work failed, 2 bad input (one line each)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from kdcache.core.errors import KDCacheError, SpecError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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


def _cmd_verify(args: argparse.Namespace) -> int:
    from kdcache.client.cache import open_reader

    reader = open_reader(args.cache)
    checks = reader.verify()
    bad = [c for c in checks if not c.ok]
    for c in bad:
        print(f"shard {c.shard}: CORRUPT: {'; '.join(c.problems)}")
    total = reader.manifest.num_shards
    print(f"{len(checks) - len(bad)}/{len(checks)} completed shards verified ok ({total} in all)")
    return EXIT_FAILED if bad else EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdcache", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
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
    _add_service_commands(sub)
    return p


def _add_service_commands(sub: argparse._SubParsersAction) -> None:
    try:
        from kdcache.cli.service_commands import add_commands
    except ImportError:
        return
    add_commands(sub)
    from kdcache.cli.slurm_commands import add_commands as add_slurm

    add_slurm(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SpecError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KDCacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
