"""Print the pip requirements of one kdcache image, read from pyproject.toml.

Used inside the image builds (``python3 requirements.py service < pyproject.toml``) and by the
compose test's wheelhouse builder, so the images and the wheelhouse agree with pyproject.toml.

- ``service``: kdcache's dependencies plus the service, s3 and postgres extras (no torch: only
  the worker and client extras bring it).
- ``worker``: kdcache's dependencies plus the worker (torch), client and s3 extras.
"""

from __future__ import annotations

import re
import sys
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (some PyTorch base images): pip vendors tomli
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # role: (extras added, distributions left out)
    "service": (("service", "s3", "postgres"), ()),
    "worker": (("worker", "client", "s3"), ()),
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def requirements(pyproject: dict[str, Any], role: str) -> list[str]:
    """The requirement strings of ``role``, deduplicated, in pyproject order."""
    extras, left_out = ROLES[role]
    project = pyproject["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    out: list[str] = []
    seen: set[str] = set()
    for req in found:
        name = _name(req)
        if name in left_out or req in seen:
            continue
        seen.add(req)
        out.append(req)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ROLES:
        print(f"usage: {argv[0]} {{{','.join(ROLES)}}} < pyproject.toml", file=sys.stderr)
        return 2
    pyproject = tomllib.loads(sys.stdin.read())
    print("\n".join(requirements(pyproject, argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
