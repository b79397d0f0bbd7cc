"""HTTP ``Range`` headers (RFC 9110 §14): one or several byte ranges of an object.

Supported: ``bytes=a-b``, ``bytes=a-`` and the suffix form ``bytes=-n``, alone or in a list
(``bytes=0-99,500-599,-16``). Ranges of a list are sorted and merged where they overlap or touch
(RFC 9110 §14.2 allows coalescing), so the answer has as few parts as possible; ranges of a list
that start past the end are dropped. A header in another unit is ignored (the whole object is sent).
A malformed or overlong bytes header, more than :data:`MAX_RANGES` ranges, or one that selects
nothing of the object, is 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdcache.core.errors import RangeNotSatisfiable

__all__ = ["MAX_RANGES", "MAX_RANGE_HEADER", "ByteRange", "parse_ranges"]

MAX_RANGE_HEADER = 8000
MAX_RANGES = 256
# ASCII digits only (\d also matches "٣"); a last byte of any length is clamped to the object
_SPEC = re.compile(r"^([0-9]{0,19})-([0-9]*)$")


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive of an object of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def _one(spec: str, header: str, size: int) -> ByteRange | None:
    """One range spec; None when it starts past the end (unsatisfiable, not malformed)."""
    m = _SPEC.match(spec)
    if m is None or m.group(0) == "-":
        raise RangeNotSatisfiable(f"malformed Range header {header!r}", size)
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return None
        return ByteRange(max(0, size - n), size - 1, size)
    start = int(first)
    end = int(last) if last else size - 1
    if end < start:
        raise RangeNotSatisfiable(f"malformed Range header {header!r}", size)
    if start >= size:
        return None
    return ByteRange(start, min(end, size - 1), size)


def _merge(ranges: list[ByteRange]) -> list[ByteRange]:
    ranges = sorted(ranges, key=lambda r: r.start)
    out = [ranges[0]]
    for r in ranges[1:]:
        last = out[-1]
        if r.start <= last.end + 1:
            out[-1] = ByteRange(last.start, max(last.end, r.end), last.size)
        else:
            out.append(r)
    return out


def parse_ranges(header: str | None, size: int) -> list[ByteRange] | None:
    """The ranges a ``Range`` header selects of ``size`` bytes, ascending and disjoint;
    None means the whole object."""
    if header is None:
        return None
    if len(header) > MAX_RANGE_HEADER:
        raise RangeNotSatisfiable(f"Range header longer than {MAX_RANGE_HEADER} characters", size)
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",") if s.strip()]  # empty list elements are allowed
    if not specs:
        raise RangeNotSatisfiable(f"malformed Range header {header!r}", size)
    if len(specs) > MAX_RANGES:
        raise RangeNotSatisfiable(f"Range header with more than {MAX_RANGES} ranges", size)
    found = [r for r in (_one(s, header, size) for s in specs) if r is not None]
    if not found:
        raise RangeNotSatisfiable(f"{header!r} selects no bytes of {size}", size)
    return _merge(found)
