"""Fixtures of the fleet tests (helpers live in ``fleet_helpers``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fleet_helpers import SLOW_TEACHER, SLOW_VOCAB, Fleet, new_fleet

from kdcache.worker import toy


@pytest.fixture(scope="session")
def slow_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding ``fleet_slow_teacher.py`` (module teacher ``fleet_slow_teacher:make``),
    importable here too (for embedded reference runs)."""
    path = tmp_path_factory.mktemp("slow-teacher")
    (path / "fleet_slow_teacher.py").write_text(SLOW_TEACHER)
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))


@pytest.fixture(scope="session")
def slow_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (12, 8) int32 ``.npy`` of ids below the slow teacher's vocab."""
    return toy.make_tokens(tmp_path_factory.mktemp("data") / "slow.npy", 12, 8, SLOW_VOCAB, seed=1)


@pytest.fixture
def fleet_factory(tmp_path: Path, slow_teacher_dir: Path) -> Iterator[Callable[..., Fleet]]:
    """Start a service (``fleet_factory(sleep=0.25, env={...})``); killed with its workers at
    teardown. ``sleep``: seconds per forward of the slow teacher; ``env``: more environment."""
    started: list[Fleet] = []

    def make(sleep: float = 0.0, env: dict[str, str] | None = None) -> Fleet:
        fleet = new_fleet(tmp_path / f"fleet{len(started)}", slow_teacher_dir, sleep, env)
        started.append(fleet)
        return fleet.start()

    yield make
    for fleet in started:
        fleet.close()


@pytest.fixture
def fleet(fleet_factory: Callable[..., Fleet]) -> Fleet:
    return fleet_factory()
