"""Range header parsing, against RFC 9110's examples for a 10000-byte object."""

from __future__ import annotations

import pytest

from kdcache.core.errors import RangeNotSatisfiable
from kdcache.service.ranges import MAX_RANGE_HEADER, ByteRange, parse_range


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-499", 0, 499),
        ("bytes=500-999", 500, 999),
        ("bytes=-500", 9500, 9999),
        ("bytes=9500-", 9500, 9999),
        ("bytes=0-0", 0, 0),
        ("bytes=-1", 9999, 9999),
        ("bytes=9000-20000", 9000, 9999),
        ("bytes=-20000", 0, 9999),
        ("BYTES = 1-2", 1, 2),
    ],
)
def test_satisfiable(header: str, start: int, end: int) -> None:
    r = parse_range(header, 10_000)
    assert r == ByteRange(start, end, 10_000)
    assert r.length == end - start + 1
    assert r.content_range == f"bytes {start}-{end}/10000"


@pytest.mark.parametrize("header", [None, "items=0-5", "bytes=0-1,5-6", "garbage"])
def test_ignored_means_the_whole_object(header: str | None) -> None:
    assert parse_range(header, 10_000) is None


@pytest.mark.parametrize(
    "header",
    [
        "bytes=10000-",
        "bytes=10000-10005",
        "bytes=-0",
        "bytes=5-4",
        "bytes=-",
        "bytes=a-b",
        "bytes=1-2-3",
        "bytes=" + "9" * 40 + "-",
        "bytes=0-" + "1" * (MAX_RANGE_HEADER + 1),
    ],
)
def test_unsatisfiable_or_malformed_is_416(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 10_000)
    assert info.value.status_code == 416
    assert info.value.headers["Content-Range"] == "bytes */10000"


def test_empty_object_has_no_satisfiable_range() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)
