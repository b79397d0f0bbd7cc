"""``kdcache report``: a self-contained HTML page, its PNG plots, and a one-screen text summary.

The numbers come from :mod:`kdcache.core.cachestats`; this module only draws them (matplotlib
with the Agg backend: no display, no browser needed) and writes them out. The HTML embeds every
PNG as a data URI, so the single file can be mailed, served by the service, or opened offline;
the PNGs are also written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.core.cachestats import CacheStats

__all__ = ["Report", "render_report", "summary_text", "write_report"]

TAIL_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Report:
    """A rendered report: the HTML page and its plots (PNG bytes by file name)."""

    html: str
    images: dict[str, bytes]
    stats: CacheStats


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ks(topk: int) -> list[int]:
    ks = [k for k in TAIL_KS if k < topk]
    return [*ks, topk] if topk else []


# -- plots -----------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_tail(s: CacheStats) -> bytes:
    fig = _figure()
    ax = fig.subplots()
    styles = {"mean": "-", "p50": "--", "p95": ":"}
    for i, (t, tail) in enumerate(s.tail.items()):
        for stat, style in styles.items():
            ax.plot(
                tail["k"], tail[stat], style, color=f"C{i}", label=f"t={t} {stat}", linewidth=1.6
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (top-k kept)")
    ax.set_ylabel("tail mass 1 - sum top-k p")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(s.tail)))
    ax.set_title("Probability mass outside the top-k (exact, from the cache)", fontsize=10)
    return _png(fig)


def _plot_entropy(s: CacheStats) -> bytes:
    fig = _figure(6.4, 2.6 * max(1, len(s.entropy)))
    axes = np.atleast_2d(fig.subplots(max(1, len(s.entropy)), 2, squeeze=False))
    for row, (t, e) in zip(axes, s.entropy.items(), strict=False):
        top = max(float(e["upper"].max(initial=0.0)), 1e-6)
        bins = np.linspace(0.0, top, 40)
        row[0].hist(e["lower"], bins=bins, alpha=0.6, label="lower bound")
        row[0].hist(e["upper"], bins=bins, alpha=0.6, label="upper bound")
        row[0].set_xlabel(f"entropy at t={t} (nats), bounds")
        row[0].legend(fontsize=7)
        row[1].hist(e["top1"], bins=np.linspace(0.0, 1.0, 41), color="C2")
        row[1].set_xlabel(f"top-1 probability at t={t} (exact)")
        for ax in row:
            ax.set_ylabel("positions")
    return _png(fig)


def _plot_bytes(s: CacheStats) -> bytes | None:
    known = [a for a in s.arrays if a["bytes_per_token"] is not None]
    if not known:
        return None
    fig = _figure(6.4, 0.4 * len(known) + 1.2)
    ax = fig.subplots()
    ax.barh([a["name"] for a in known], [a["bytes_per_token"] for a in known], color="C0")
    ax.invert_yaxis()
    ax.set_xlabel("bytes per token (on disk, compressed)")
    return _png(fig)


def _plot_shards(s: CacheStats) -> bytes | None:
    timed = [x for x in s.shards if x.tokens_per_s is not None]
    if not timed:
        return None
    writers = sorted({x.writer for x in timed})
    fig = _figure()
    ax = fig.subplots()
    for i, w in enumerate(writers):
        mine = [x for x in timed if x.writer == w]
        ax.bar([x.shard for x in mine], [x.tokens_per_s for x in mine], color=f"C{i}", label=w)
    ax.set_xlabel("shard")
    ax.set_ylabel("tokens/s")
    if len(writers) <= 12:
        ax.legend(fontsize=7, title="writer", title_fontsize=7)
    return _png(fig)


def _plot_hidden(s: CacheStats) -> bytes | None:
    layers = [(k, v) for k, v in s.hidden.items() if v]
    if not layers:
        return None
    fig = _figure()
    ax = fig.subplots()
    boxes = [
        {
            "label": k,
            "whislo": v["p5"],
            "q1": v["p25"],
            "med": v["p50"],
            "q3": v["p75"],
            "whishi": v["p95"],
            "mean": v["mean"],
        }
        for k, v in layers
    ]
    ax.bxp(boxes, showfliers=False, showmeans=True)
    ax.set_xlabel("hidden layer (HF hidden_states index)")
    ax.set_ylabel("L2 norm per position (p5..p95)")
    return _png(fig)


# -- text --------------------------------------------------------------------------------------


def _sample_note(s: CacheStats) -> str:
    if s.sampled:
        return (
            f"sampled {s.rows_sampled} of {s.rows_done} completed rows ({s.positions} positions"
            f"{', loss_mask positions only' if s.masked else ''})"
        )
    return f"all {s.rows_done} completed rows ({s.positions} positions)"


def summary_text(s: CacheStats) -> str:
    """The one-screen terminal summary."""
    lines = [
        f"cache      {s.cache_id}  ({s.name})",
        f"rows       {s.rows_done}/{s.num_rows} done x {s.seq_len} tokens; "
        f"{len(s.shards)}/{s.shards_total} shards",
        f"vocab      {s.vocab_size}, top-k {s.topk}, temperatures {s.temperatures}",
        f"numbers    {_sample_note(s)}",
    ]
    ks = _ks(s.topk)
    if s.tail and ks:
        lines.append("tail mass  (1 - sum of the top-k probabilities; exact)")
        lines.append("  t     stat  " + "".join(f"{'k=' + str(k):>8}" for k in ks))
        for t in s.tail:
            for stat in ("mean", "p50", "p95"):
                vals = "".join(f"{s.tail_at(float(t), k, stat):8.3f}" for k in ks)
                lines.append(f"  {t:<5} {stat:<5} {vals}")
    for t, e in s.entropy.items():
        if e["top1"].size:
            lines.append(
                f"t={t:<8} entropy {e['lower'].mean():.3f}..{e['upper'].mean():.3f} nats "
                f"(mean of bounds), top-1 p mean {e['top1'].mean():.3f}"
            )
    if s.bytes_total is not None and s.bytes_per_token is not None:
        per = ", ".join(
            f"{a['name']} {a['bytes_per_token']:.1f}" for a in s.arrays if a["bytes_per_token"]
        )
        lines.append(
            f"on disk    {_human_bytes(s.bytes_total)}, {s.bytes_per_token:.1f} B/token ({per})"
        )
    timed = [x.tokens_per_s for x in s.shards if x.tokens_per_s is not None]
    if timed:
        writers = len({x.writer for x in s.shards})
        lines.append(
            f"shards     {np.median(timed):,.0f} tokens/s median per shard "
            f"(min {min(timed):,.0f}, max {max(timed):,.0f}), {writers} writer(s)"
        )
    if s.hidden:
        norms = ", ".join(f"{k}: {v['p50']:.2f}" for k, v in s.hidden.items() if v)
        lines.append(f"hidden     median L2 norm per layer: {norms}")
    return "\n".join(lines)


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9em}img{max-width:100%}
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{h}</tr>{body}</table>"


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return f'<p class="note">{html.escape(alt)}: nothing to plot.</p>'
    data = base64.b64encode(images[name]).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _writers_table(s: CacheStats) -> str:
    by: dict[str, list[Any]] = {}
    for x in s.shards:
        by.setdefault(x.writer, []).append(x)
    rows = []
    for w, xs in sorted(by.items()):
        tokens, secs = sum(x.tokens for x in xs), sum(x.seconds for x in xs)
        rate = f"{tokens / secs:,.0f}" if secs > 0 else "?"
        rows.append([w, str(len(xs)), f"{tokens:,}", f"{secs:,.1f}", rate])
    return _table(["writer", "shards", "tokens", "seconds", "tokens/s"], rows)


def _html(s: CacheStats, images: dict[str, bytes]) -> str:
    ks = _ks(s.topk)
    tail_rows = [
        [f"t={t} {stat}", *[f"{s.tail_at(float(t), k, stat):.4f}" for k in ks]]
        for t in s.tail
        for stat in ("mean", "p50", "p95")
    ]
    bytes_rows = [
        [
            a["name"],
            _human_bytes(a["bytes"]) if a["bytes"] is not None else "unknown",
            f"{a['bytes_per_token']:.2f}" if a["bytes_per_token"] is not None else "unknown",
        ]
        for a in s.arrays
    ]
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>kdcache report {e(s.cache_id)}"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>kdcache report: {e(s.name or s.cache_id)}</h1>",
        f"<p>cache <code>{e(s.cache_id)}</code>: {s.rows_done}/{s.num_rows} rows of {s.seq_len}"
        f" tokens done ({len(s.shards)}/{s.shards_total} shards); vocabulary {s.vocab_size}, "
        f"top-k {s.topk}, temperatures {e(str(s.temperatures))}.</p>",
        f"<p class='note'>Distribution numbers: {e(_sample_note(s))}.</p>",
        "<h2>Tail mass vs k</h2>",
        "<p class='note'>Exact: probabilities come from the cached top-k log-probabilities and "
        "the full-vocabulary log-normaliser of each temperature (float16 rounding aside).</p>",
        _img(images, "tail_mass.png", "tail mass vs k"),
        _table(["", *[f"k={k}" for k in ks]], tail_rows) if ks else "",
        "<h2>Entropy and top-1 probability</h2>",
        "<p class='note'>Top-1 probability is exact. Entropy is shown as <b>bounds</b>: the cache "
        "does not say how the tail mass spreads over the other V-k ids. Lower bound: each tail "
        "probability is at most min(p_k, tail); upper bound: the tail spread uniformly.</p>",
        _img(images, "entropy.png", "entropy and top-1 histograms"),
        "<h2>Bytes per token by array</h2>",
        _img(images, "bytes.png", "bytes per token"),
        _table(["array", "on disk", "bytes/token"], bytes_rows),
        "<h2>Shards: timings and writers</h2>",
        "<p class='note'>From the completion records: tokens / seconds of each shard.</p>",
        _img(images, "shards.png", "tokens/s per shard"),
        _writers_table(s),
        "<h2>Hidden-state norms per layer</h2>",
        f"<p class='note'>L2 norm of each position's hidden vector, over {s.hidden_positions} "
        "positions (box: p25..p75, whiskers: p5..p95, triangle: mean).</p>",
        _img(images, "hidden_norms.png", "hidden-state norms"),
        "</body></html>",
    ]
    return "\n".join(parts)


def render_report(stats: CacheStats) -> Report:
    """Draw every plot and the HTML page (matplotlib is imported here, with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    plots: dict[str, Callable[[CacheStats], bytes | None]] = {
        "tail_mass.png": _plot_tail,
        "entropy.png": _plot_entropy,
        "bytes.png": _plot_bytes,
        "shards.png": _plot_shards,
        "hidden_norms.png": _plot_hidden,
    }
    images: dict[str, bytes] = {}
    for name, plot in plots.items():
        if name in ("tail_mass.png", "entropy.png") and not stats.tail:
            continue
        png = plot(stats)
        if png is not None:
            images[name] = png
    return Report(_html(stats, images), images, stats)


def write_report(report: Report, out: str | Path) -> Path:
    """Write ``index.html``, the PNGs and ``report.json`` into ``out``; returns the HTML path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, png in report.images.items():
        (folder / name).write_bytes(png)
    (folder / "report.json").write_text(json.dumps(report.stats.to_dict(), indent=1))
    page = folder / "index.html"
    page.write_text(report.html)
    return page
