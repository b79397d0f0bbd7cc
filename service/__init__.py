"""kdcache's service: jobs over REST, shard leases for workers, caches served over HTTP.

Imports no torch or transformers (a test enforces it)::

    from kdcache.service import Settings, create_app
    app = create_app(Settings(root="/data/kdcache", admin_token="...", worker_token="..."))
"""

from kdcache.service.app import create_app
from kdcache.service.settings import Settings, get_settings

__all__ = ["Settings", "create_app", "get_settings"]
