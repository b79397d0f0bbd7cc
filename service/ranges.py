"""HTTP ``Range`` headers (RFC 9110 §14) for one byte range of an object.

Supported: ``bytes=a-b``, ``bytes=a-`` and the suffix form ``bytes=-n``. A header naming several
ranges is ignored (the whole object is sent with 200, which RFC 9110 allows): zarr and fsspec
never ask for more than one. A header in another unit is ignored too. A malformed or overlong
bytes header, or one that selects nothing of the object, is 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdcache.core.errors import RangeNotSatisfiable

__all__ = ["MAX_RANGE_HEADER", "ByteRange", "parse_range"]

MAX_RANGE_HEADER = 200
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


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range a ``Range`` header selects of ``size`` bytes; None means the whole object."""
    if header is None:
        return None
    if len(header) > MAX_RANGE_HEADER:
        raise RangeNotSatisfiable(f"Range header longer than {MAX_RANGE_HEADER} characters", size)
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    m = _SPEC.match(spec.strip())
    if m is None or m.group(0) == "-":
        raise RangeNotSatisfiable(f"malformed Range header {header!r}", size)
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"{header!r} selects no bytes of {size}", size)
        return ByteRange(max(0, size - n), size - 1, size)
    start = int(first)
    end = int(last) if last else size - 1
    if end < start:
        raise RangeNotSatisfiable(f"malformed Range header {header!r}", size)
    if start >= size:
        raise RangeNotSatisfiable(f"{header!r} starts beyond the object's {size} bytes", size)
    return ByteRange(start, min(end, size - 1), size)
