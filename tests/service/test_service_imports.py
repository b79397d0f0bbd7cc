"""``import kdcache.service`` stays free of torch and transformers."""

from __future__ import annotations

import subprocess
import sys


def test_service_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys, kdcache.service, kdcache.service.app, kdcache.service.routes; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "print(','.join(bad) or 'clean')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "clean"
