"""The REST API's routers, one per resource."""

from kdcache.service.routes import caches, jobs, leases, ops

__all__ = ["caches", "jobs", "leases", "ops"]
