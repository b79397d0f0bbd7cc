"""Imports point one way, and the public surfaces are exactly what the contract names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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


def test_client_hf_is_imported_on_demand() -> None:
    pytest.importorskip("accelerate")
    mods = _modules_after("from kdcache.client.hf import KDConfig, KDTrainer")
    assert "transformers" in _top(mods) and "fastapi" not in _top(mods)
    assert not {m for m in mods if m.startswith(("kdcache.worker", "kdcache.service"))}


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


# ---- the import graph, statically, over every module ----------------------------------------
_COMPONENTS = ("core", "worker", "service", "client", "cli")
_ROOT = Path(__file__).resolve().parents[1]


def _imports_of(path: Path) -> set[str]:
    """Every kdcache module a file imports, at any depth (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.startswith("kdcache.")}


def test_import_graph_points_only_into_core() -> None:
    """core imports only core; worker, service and client import core and themselves; the cli
    may import everything. Checked on the source of every module, so no lazy import escapes."""
    checked = 0
    bad = []
    for comp in _COMPONENTS:
        allowed = {"core", comp} if comp != "cli" else set(_COMPONENTS)
        for path in sorted((_ROOT / comp).rglob("*.py")):
            checked += 1
            for mod in _imports_of(path):
                target = mod.split(".")[1]
                if target not in allowed:
                    bad.append(f"{path.relative_to(_ROOT)} imports {mod}")
    assert checked > 60  # every module was seen
    assert not bad, "\n".join(bad)


def test_import_graph_check_catches_a_wrong_arrow(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from kdcache.service.store import JobStore\n")
    assert _imports_of(f) == {"kdcache.service.store"}


# imported only by name, for what they wrap: kdcache.client.hf is the Hugging Face Trainer
_ON_DEMAND = {"kdcache.client.hf"}


def _every_module(comp: str) -> list[str]:
    out = []
    for path in sorted((_ROOT / comp).rglob("*.py")):
        rel = path.relative_to(_ROOT / comp).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append(".".join(["kdcache", comp, *parts]))
    return out


@pytest.mark.parametrize(
    ("comp", "forbidden"),
    [
        ("worker", ("kdcache.service", "kdcache.client", "fastapi", "uvicorn", "sqlalchemy")),
        ("service", ("kdcache.worker", "kdcache.client", "torch", "transformers")),
        ("client", ("kdcache.worker", "kdcache.service", "fastapi", "transformers")),
        ("core", ("kdcache.worker", "kdcache.service", "kdcache.client", "torch", "fastapi")),
    ],
)
def test_importing_every_module_of_a_component_stays_inside_it(
    comp: str, forbidden: tuple[str, ...]
) -> None:
    """Really import every module of the component (the worker boundary included); modules
    imported on demand for a heavy dependency are checked by their own tests."""
    mods = [m for m in _every_module(comp) if m not in _ON_DEMAND]
    loaded = _modules_after("; ".join(f"import {m}" for m in mods))
    assert set(mods) <= loaded  # the probe really imported them
    bad = {m for m in loaded if m == m.split(".")[0] and m in forbidden}
    bad |= {m for m in loaded if m.startswith(tuple(f for f in forbidden if "." in f))}
    assert not bad, f"kdcache.{comp} loads {sorted(bad)}"
