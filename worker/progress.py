"""Progress of long work: tqdm bars on a terminal (the job, and the shard in hand, batch by
batch), periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "format_duration"]

log = logging.getLogger("kdcache.progress")


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts rows and tokens of a job; shows rows done/total, tokens/s and ETA."""

    def __init__(
        self,
        total_rows: int,
        seq_len: int,
        *,
        done_rows: int = 0,
        stream: TextIO | None = None,
        interval: float = 10.0,
        label: str = "kdcache",
    ) -> None:
        self.total_rows = total_rows
        self.seq_len = seq_len
        self.done_rows = done_rows
        self.new_rows = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.live else interval
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._bar: Any = None
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_rows,
                initial=done_rows,
                unit="row",
                desc=label,
                file=self.stream,
                dynamic_ncols=True,
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def tokens_per_s(self) -> float:
        e = self.elapsed
        return self.new_rows * self.seq_len / e if e > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.new_rows / self.elapsed if self.elapsed > 0 else 0.0
        left = self.total_rows - self.done_rows
        return left / rate if rate > 0 else (0.0 if left <= 0 else None)

    def line(self) -> str:
        pct = 100.0 * self.done_rows / self.total_rows if self.total_rows else 100.0
        return (
            f"{self.label}: {self.done_rows}/{self.total_rows} rows ({pct:.1f}%), "
            f"{self.tokens_per_s:,.0f} tokens/s, ETA {format_duration(self.eta_s)}"
        )

    @contextmanager
    def shard(self, shard: int, rows: int) -> Iterator[Callable[[int], None]]:
        """A bar for the shard being computed (terminal only); yields its ``update(rows)``."""
        if self._bar is None:
            yield lambda n: None
            return
        from tqdm import tqdm

        with tqdm(
            total=rows,
            unit="row",
            desc=f"shard {shard}",
            file=self.stream,
            position=1,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            yield bar.update

    def update(self, rows: int) -> None:
        self.done_rows += rows
        self.new_rows += rows
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(f"{self.tokens_per_s:,.0f} tokens/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval or self.done_rows >= self.total_rows:
            self._last = now
            self._show()

    def _show(self) -> None:
        log.info(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self.stream.write(self.line() + "\n")
            self.stream.flush()
        elif self._last == 0.0:
            log.info(self.line())
