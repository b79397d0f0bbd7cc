"""The REST API's routers, one per resource."""

from kdcache.service.routes import caches, dashboard, jobs, leases, ops

__all__ = ["caches", "dashboard", "jobs", "leases", "ops"]
