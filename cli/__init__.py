"""The ``kdcache`` command line: one entry point, components imported lazily per command."""

from kdcache.cli.main import main

__all__ = ["main"]
