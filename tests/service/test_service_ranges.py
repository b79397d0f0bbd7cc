"""Range header parsing, against RFC 9110's examples for a 10000-byte object."""

from __future__ import annotations

import pytest

from kdcache.core.errors import RangeNotSatisfiable
from kdcache.service.ranges import MAX_RANGE_HEADER, MAX_RANGES, ByteRange, parse_ranges


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
    found = parse_ranges(header, 10_000)
    assert found is not None and len(found) == 1
    r = found[0]
    assert r == ByteRange(start, end, 10_000)
    assert r.length == end - start + 1
    assert r.content_range == f"bytes {start}-{end}/10000"


@pytest.mark.parametrize("header", [None, "items=0-5", "items=0-1,5-6", "garbage"])
def test_ignored_means_the_whole_object(header: str | None) -> None:
    assert parse_ranges(header, 10_000) is None


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("bytes=0-1,5-6", [(0, 1), (5, 6)]),
        ("bytes=500-599, 0-99", [(0, 99), (500, 599)]),  # sorted
        ("bytes=0-99,50-149,-100", [(0, 149), (9900, 9999)]),  # overlaps merged
        ("bytes=0-99,100-199", [(0, 199)]),  # touching ranges merged
        ("bytes=0-1,,4-5,", [(0, 1), (4, 5)]),  # empty list elements are allowed
        ("bytes=0-1,20000-30000", [(0, 1)]),  # a range past the end is dropped
        ("bytes=9998-,-1", [(9998, 9999)]),
    ],
)
def test_several_ranges(header: str, want: list[tuple[int, int]]) -> None:
    found = parse_ranges(header, 10_000)
    assert found == [ByteRange(a, b, 10_000) for a, b in want]


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
        "bytes=0-1,a-b",  # one malformed range spoils the list
        "bytes=10000-,20000-",  # none satisfiable
        "bytes=,",
        "bytes=" + ",".join(["0-1"] * (MAX_RANGES + 1)),
    ],
)
def test_unsatisfiable_or_malformed_is_416(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_ranges(header, 10_000)
    assert info.value.status_code == 416
    assert info.value.headers["Content-Range"] == "bytes */10000"


def test_empty_object_has_no_satisfiable_range() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_ranges("bytes=0-", 0)
    with pytest.raises(RangeNotSatisfiable):
        parse_ranges("bytes=-5", 0)
