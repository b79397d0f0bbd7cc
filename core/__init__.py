"""kdcache's contract: the job spec, the cache format, fingerprints and errors.

Imports no torch, fastapi or transformers: the worker, the service and the client all stand on it.
"""

from kdcache.core.errors import (
    CacheFormatError,
    CacheNotFoundError,
    DatasetError,
    IntegrityError,
    KDCacheError,
    ManifestMismatchError,
    Problem,
    ShardIncompleteError,
    SpecError,
    TeacherError,
    TemperatureNotCachedError,
)
from kdcache.core.format import FORMAT_VERSION, Manifest, hidden_array, index_dtype
from kdcache.core.reader import CacheReader
from kdcache.core.resolve import JobPlan, TeacherInfo, resolve_job
from kdcache.core.shards import ShardRecord
from kdcache.core.spec import DatasetSpec, JobSpec, OutputSpec, TeacherSpec, load_spec, parse_spec
from kdcache.core.storage import Storage, open_storage
from kdcache.core.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "CacheFormatError",
    "CacheNotFoundError",
    "CacheReader",
    "CacheWriter",
    "DatasetError",
    "DatasetSpec",
    "IntegrityError",
    "JobPlan",
    "JobSpec",
    "KDCacheError",
    "Manifest",
    "ManifestMismatchError",
    "OutputSpec",
    "Problem",
    "ShardIncompleteError",
    "ShardRecord",
    "SpecError",
    "Storage",
    "TeacherError",
    "TeacherInfo",
    "TeacherSpec",
    "TemperatureNotCachedError",
    "hidden_array",
    "index_dtype",
    "load_spec",
    "open_storage",
    "parse_spec",
    "resolve_job",
]
