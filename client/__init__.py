"""kdcache's client: read caches and distil from them.

``TeacherCache`` gives random access by row, ``CacheDataset`` streams rows into training,
``MultiCache`` reads several teachers' caches as one ensemble, ``CacheClient`` talks to the
service's REST API, and ``losses`` holds the KD losses that consume what the cache holds.
Imports neither fastapi nor transformers.
"""

from kdcache.client import losses
from kdcache.client.cache import TeacherCache
from kdcache.client.dataset import CacheDataset, CacheLoader, ResumeError
from kdcache.client.ensemble import MultiCache
from kdcache.client.layermap import HiddenProjector, LayerMap
from kdcache.client.layerselect import LearnedLayerMap
from kdcache.client.rest import CacheClient

__all__ = [
    "CacheClient",
    "CacheDataset",
    "CacheLoader",
    "HiddenProjector",
    "LayerMap",
    "LearnedLayerMap",
    "MultiCache",
    "ResumeError",
    "TeacherCache",
    "losses",
]
