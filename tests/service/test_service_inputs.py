"""The smaller findings of issue 11: temperature bounds, ASCII digits, blank and short tokens,
Range ends past the object."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kdcache.core.errors import SpecError
from kdcache.core.spec import parse_spec
from kdcache.service import Settings
from kdcache.service.ranges import parse_ranges

_BASE = {"teacher": {"hf": "/t"}, "dataset": {"tokens": "/d.npy"}}


@pytest.mark.parametrize(
    ("outputs", "field"),
    [
        ({"temperatures": [1e-320]}, "outputs.temperatures"),
        ({"temperatures": [float(i + 1) for i in range(100_000)]}, "outputs.temperatures"),
        ({"hidden_layers": "uniform:٣"}, "outputs.hidden_layers"),
    ],
)
def test_spec_refuses_absurd_outputs(outputs: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**_BASE, "outputs": {"topk": 4, **outputs}})
    assert [p.field for p in info.value.problems] == [field]


def test_spec_refuses_non_ascii_device_digits() -> None:
    with pytest.raises(SpecError, match="teacher.device"):
        parse_spec({**_BASE, "teacher": {"hf": "/t", "device": "cuda:٣"}})
    assert parse_spec({**_BASE, "outputs": {"temperatures": [0.5, 2.0]}}).outputs.temperatures


def test_blank_tokens_are_unset_and_short_ones_refused(tmp_path: Path) -> None:
    s = Settings(root=str(tmp_path), admin_token="   ", worker_token="\t")
    assert s.open_routes() == ["admin", "worker", "read"]  # so serve refuses 0.0.0.0
    with pytest.raises(ValidationError, match="at least 8 characters"):
        Settings(root=str(tmp_path), admin_token="abc")
    assert Settings(root=str(tmp_path), admin_token=" long-enough ").token("admin") == "long-enough"


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("bytes=0-99999999999999999999999", (0, 99)),
        ("bytes=10-100", (10, 99)),
        ("bytes=-99999999999999999999999", (0, 99)),
    ],
)
def test_a_range_end_past_the_object_is_clamped(header: str, want: tuple[int, int]) -> None:
    found = parse_ranges(header, 100)
    assert found is not None and [(r.start, r.end) for r in found] == [want]


def test_a_range_in_other_digits_is_416() -> None:
    from kdcache.core.errors import RangeNotSatisfiable

    with pytest.raises(RangeNotSatisfiable):
        parse_ranges("bytes=٣-5", 100)
