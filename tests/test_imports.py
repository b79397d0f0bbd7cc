"""Imports point one way, and the public surfaces are exactly what the contract names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys, json; {stmt}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def _top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_client_imports_no_fastapi_or_transformers() -> None:
    mods = _top(_modules_after("import kdcache.client; from kdcache.client import losses"))
    assert "fastapi" not in mods and "transformers" not in mods and "uvicorn" not in mods
    assert "torch" in mods  # sanity: the probe really imported the client


def test_core_imports_no_heavy_component() -> None:
    mods = _modules_after("import kdcache.core")
    assert not _top(mods) & {"torch", "fastapi", "transformers", "uvicorn"}
    assert not {
        m for m in mods if m.startswith(("kdcache.worker", "kdcache.service", "kdcache.client"))
    }


def test_components_do_not_import_each_other() -> None:
    for comp, others in [
        ("worker", ("service", "client")),
        ("client", ("worker", "service")),
    ]:
        mods = _modules_after(f"import kdcache.{comp}")
        bad = {m for m in mods if m.startswith(tuple(f"kdcache.{o}" for o in others))}
        assert not bad, f"kdcache.{comp} imports {bad}"


def test_client_public_surface() -> None:
    import kdcache.client

    names = {"TeacherCache", "CacheDataset", "CacheClient", "LayerMap", "losses"}
    missing = names - set(kdcache.client.__all__)
    if "CacheDataset" in missing:
        pytest.fail("kdcache.client must export CacheDataset")
    assert not missing
    for name in kdcache.client.__all__:
        assert hasattr(kdcache.client, name)


def test_cli_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for cmd in ("run", "inspect", "verify"):
        assert cmd in out.stdout
