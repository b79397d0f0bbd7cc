"""Every error kdcache raises on purpose.

One tree, rooted at :class:`KDCacheError`. Each class also inherits the built-in that matches
its meaning, so callers that already catch ``ValueError`` or ``FileNotFoundError`` keep working::

    KDCacheError
    ├── SpecError(ValueError)                 a job spec is invalid; ``problems`` lists them all
    ├── TeacherError                          the teacher cannot be loaded or run
    ├── DatasetError(ValueError)              bad data (``row`` names the dataset row when known)
    ├── TemperatureNotCachedError(ValueError) a loss asked for a temperature the cache lacks
    ├── ManifestMismatchError(ValueError)     a cache is not what the run declared
    ├── CacheFormatError(ValueError)          a store is not a kdcache cache of a known version
    ├── CacheNotFoundError(FileNotFoundError) no cache at that path or URL
    ├── ShardIncompleteError(LookupError)     rows of a shard that is not complete yet
    ├── IntegrityError                        a shard's checksums do not match its record
    └── ServiceError                          the service answered with an error (status, code)

The service maps these to HTTP status codes in one handler; the CLI maps them to exit codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CacheFormatError",
    "CacheNotFoundError",
    "DatasetError",
    "IntegrityError",
    "KDCacheError",
    "ManifestMismatchError",
    "Problem",
    "ServiceError",
    "ShardIncompleteError",
    "SpecError",
    "TeacherError",
    "TemperatureNotCachedError",
]


class KDCacheError(Exception):
    """Root of every error kdcache raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem with a job spec: ``field`` is a dotted path such as ``outputs.topk``."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(KDCacheError, ValueError):
    """A job spec is invalid. ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid job spec")


class TeacherError(KDCacheError):
    """The teacher cannot be loaded or run (missing directory, bad weights, bad callable)."""


class DatasetError(KDCacheError, ValueError):
    """The dataset holds something the teacher cannot run on; ``row`` is the dataset row."""

    def __init__(self, message: str, *, row: int | None = None) -> None:
        self.row = row
        super().__init__(message)


class TemperatureNotCachedError(KDCacheError, ValueError):
    """A loss asked for the exact normaliser of a temperature the cache does not hold."""


class ManifestMismatchError(KDCacheError, ValueError):
    """A cache does not match what the caller declared (vocab, temperatures, layers, id)."""


class CacheFormatError(KDCacheError, ValueError):
    """A store is not a kdcache cache, or of a format version this code cannot read."""


class CacheNotFoundError(KDCacheError, FileNotFoundError):
    """No cache exists at the given path or URL."""


class ShardIncompleteError(KDCacheError, LookupError):
    """Rows were requested from a shard that has not been completed."""


class IntegrityError(KDCacheError):
    """A completed shard's data no longer matches the checksums recorded at completion."""


class ServiceError(KDCacheError):
    """The kdcache service answered with an error: ``status`` is the HTTP status code, ``code``
    the service's error code (``not_found``, ``lease_lost``, ...), ``body`` the decoded answer."""

    def __init__(
        self, message: str, *, status: int, code: str = "", body: object | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.body = body
        super().__init__(message)
