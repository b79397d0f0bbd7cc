#!/usr/bin/env bash
# Fill a wheelhouse for offline image builds: every wheel the service, worker and test S3 images
# install, at the versions of this checkout's virtual environment (so the containers compute with
# the same torch as an embedded run here), plus the build backend kdcache's source needs.
#
#   scripts/compose/wheelhouse.sh OUT_DIR [PYTHON]
set -euo pipefail

out=${1:?usage: wheelhouse.sh OUT_DIR [PYTHON]}
python=${2:-.venv/bin/python}
here=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Pins from the venv, without local version labels (torch 2.13.0+cpu -> torch==2.13.0, which the
# +cpu wheel satisfies) and without kdcache itself.
"$python" -m pip freeze --exclude-editable |
    grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^kdcache==' | sed -E 's/\+[A-Za-z0-9.]+$//' \
    >"$tmp/constraints.txt"
{
    "$python" "$here/docker/requirements.py" service <"$here/pyproject.toml"
    "$python" "$here/docker/requirements.py" worker <"$here/pyproject.toml"
    printf '%s\n' "moto[s3]" flask flask-cors "setuptools>=77" wheel
} | sort -u >"$tmp/requirements.txt"

mkdir -p "$out"
if ! "$python" -m pip wheel --quiet --wheel-dir "$out" \
    --constraint "$tmp/constraints.txt" --requirement "$tmp/requirements.txt" 2>"$tmp/pip.log"; then
    cat "$tmp/pip.log" >&2
    exit 1
fi
echo "wheelhouse: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
