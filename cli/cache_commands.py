"""``kdcache report | ls``: what a cache holds, drawn, and which caches a root holds."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_commands", "print_cache_list"]

EXIT_OK, EXIT_FAILED = 0, 1


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _cmd_report(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kdcache.client.cache import open_reader
    from kdcache.core.cachestats import cache_stats
    from kdcache.core.report import render_report, summary_text, write_report

    reader = open_reader(args.cache)
    m = reader.manifest
    out = args.out or f"kdcache-report-{m.cache_id[:12]}"
    rows = min(reader.rows_done, max(1, args.max_positions // max(1, m.seq_len)))
    with tqdm(total=rows, unit="row", desc="report", disable=None, leave=False) as bar:
        stats = cache_stats(reader, max_positions=args.max_positions, progress=bar.update)
    page = write_report(render_report(stats), out)
    print(summary_text(stats))
    print(f"report     {page}")
    return EXIT_OK


def print_cache_list(caches: list[dict[str, Any]], as_json: bool = False) -> None:
    """One line per cache: id, name, rows done/total, size, completeness."""
    if as_json:
        print(json.dumps(caches, indent=1))
        return
    head = ("CACHE", "NAME", "ROWS", "SHARDS", "SIZE", "STATE")
    rows = [
        (
            (c["cache_id"], "?", "?", "?", "?", f"unreadable: {c['error']}")
            if "error" in c
            else (
                c["cache_id"],
                str(c["name"])[:28],
                f"{c['rows_done']}/{c['rows']}",
                f"{c['shards_done']}/{c['shards_total']}",
                _human_bytes(c["bytes"]),
                "complete" if c["complete"] else "incomplete",
            )
        )
        for c in caches
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


def _cmd_ls(args: argparse.Namespace) -> int:
    from kdcache.core.catalog import describe_cache, find_caches

    urls = find_caches(args.root)
    if not urls:
        print(f"no caches under {args.root} (looked in {args.root.rstrip('/')}/caches)")
        return EXIT_FAILED
    print_cache_list([describe_cache(u) for u in urls], args.json)
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report`` and ``ls`` to the ``kdcache`` parser."""
    rep = sub.add_parser(
        "report",
        help="HTML page and PNG plots: tail mass vs k, entropy, bytes, shard timings, norms",
        description="Write an HTML report with PNG plots of a cache and print a summary.",
    )
    rep.add_argument("cache", help="cache directory, s3:// URL or service cache URL")
    rep.add_argument("--out", help="output folder (default: ./kdcache-report-<cache id>)")
    rep.add_argument(
        "--max-positions",
        type=int,
        default=262_144,
        help="sample rows so that at most this many positions are read (default: 262144)",
    )
    rep.set_defaults(func=_cmd_report)

    ls = sub.add_parser(
        "ls",
        help="the caches under a storage root: name, rows, size, completeness",
        description="List the caches under a storage root (ROOT/caches/<id>).",
    )
    ls.add_argument("root", help="storage root (directory or s3://...)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_cmd_ls)
