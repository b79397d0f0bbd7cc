"""scripts/e2e_preamble.sh, the start that test_compose.sh and test_slurm.sh share, sourced by
bash as they do (the end-to-end runs themselves are ``make test-compose`` / ``make test-slurm``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"

# what a test script does after sourcing: use the helpers, then remove its work dir
PROBE = """
set -euo pipefail
E2E_NAME=probe E2E_ROOT="it probes"
. "$1/e2e_preamble.sh"
log "hello"
echo "root=$ROOT work=$WORK port=$(free_port) mode=$(stat -c %a "$WORK") pwd=$(pwd)"
apt_install  # nothing missing: installs nothing, leaves no policy-rc.d behind
echo "policy=[$POLICY_RC]"
rmdir "$WORK"
die "stopping here"
"""


def _probe(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(
        ["bash", "-c", PROBE, "probe", str(SCRIPTS)],
        cwd=tmp_path,  # the preamble moves to the repository root itself
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_both_end_to_end_scripts_source_the_preamble() -> None:
    for name in ("test_compose.sh", "test_slurm.sh"):
        text = (SCRIPTS / name).read_text()
        assert '. "$(dirname "$0")/e2e_preamble.sh"' in text, name
        for own in ("log() {", "free_port() {", "mktemp -d", "policy-rc.d"):
            assert own not in text, f"{name} defines {own!r} again"
        res = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_preamble_sets_up_what_the_scripts_use(tmp_path: Path) -> None:
    res = _probe(tmp_path)
    if os.geteuid() != 0:
        assert res.returncode == 1
        assert "[test-probe" in res.stdout and "ERROR: must run as root (it probes)" in res.stdout
        return
    assert res.returncode == 1, res.stdout + res.stderr  # from `die`, after all else ran
    lines = res.stdout.splitlines()
    assert re.fullmatch(r"\[test-probe +\d+s\] hello", lines[0]), lines
    fields = dict(part.split("=", 1) for part in lines[1].split())
    assert fields["root"] == str(REPO) and fields["pwd"] == str(REPO)
    assert fields["work"].startswith("/tmp/kdcache-probe.") and fields["mode"] == "755"
    assert not Path(fields["work"]).exists()  # removed by the probe: it was an empty directory
    assert 0 < int(fields["port"]) < 65536
    assert lines[2] == "policy=[]"
    assert re.fullmatch(r"\[test-probe +\d+s\] ERROR: stopping here", lines[3]), lines
