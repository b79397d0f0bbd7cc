"""Check a cache's manifest against what a student run declares, before any training step.

Training on targets of another tokenizer, vocabulary or layer set gives no error, only a bad
student; so a run states what it expects and every mismatch is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from kdcache.core.errors import ManifestMismatchError
from kdcache.core.fingerprint import tokenizer_fingerprint
from kdcache.core.format import Manifest

__all__ = ["EXPECT_KEYS", "check_ensemble_expectations", "check_expectations"]

EXPECT_KEYS = (
    "cache_id",
    "vocab_size",
    "tokenizer_fingerprint",
    "tokenizer",
    "temperatures",
    "layers",
    "topk",
    "seq_len",
    "teacher_fingerprint",
    "dataset_fingerprint",
)
_TOLERANCE = 1e-6
IDENTITY_KEYS = ("cache_id", "teacher_fingerprint")
"""Keys that name one cache: an ensemble takes them as a list, one entry (or None) per cache."""


def _same(name: str, want: Any, got: Any, problems: list[str]) -> None:
    if want != got:
        problems.append(f"{name}: the run expects {want!r}, the cache has {got!r}")


def _tokenizer(m: Manifest, want_fp: str | None, source: str, problems: list[str]) -> None:
    if want_fp is None:
        problems.append(f"tokenizer: {source} holds no tokenizer files to fingerprint")
    elif m.tokenizer_fingerprint is None:
        problems.append(
            f"tokenizer: the run expects tokenizer {want_fp}, but the cache records no tokenizer "
            "fingerprint (it was made from pre-tokenised ids); check vocab_size instead"
        )
    elif want_fp != m.tokenizer_fingerprint:
        problems.append(
            f"tokenizer: the run's tokenizer {want_fp} ({source}) is not the cache's "
            f"{m.tokenizer_fingerprint}; the cached targets index another vocabulary"
        )


def check_expectations(manifest: Manifest, expect: Mapping[str, Any] | None) -> None:
    """Raise :class:`ManifestMismatchError` listing every way ``manifest`` differs from ``expect``.

    ``expect`` keys (all optional): ``cache_id``, ``vocab_size``, ``tokenizer_fingerprint`` or
    ``tokenizer`` (a tokenizer directory, fingerprinted here), ``temperatures`` (each must be
    cached), ``layers`` (teacher hidden layers that must be cached), ``topk`` (at least this many
    cached), ``seq_len`` (at most the cached length), ``teacher_fingerprint``,
    ``dataset_fingerprint``.
    """
    if not expect:
        return
    m = manifest
    problems: list[str] = []
    unknown = sorted(set(expect) - set(EXPECT_KEYS))
    if unknown:
        problems.append(f"expect: unknown keys {unknown}; known keys are {list(EXPECT_KEYS)}")
    for key in ("cache_id", "vocab_size", "teacher_fingerprint", "dataset_fingerprint"):
        if expect.get(key) is not None:
            _same(key, expect[key], getattr(m, key), problems)
    if expect.get("tokenizer_fingerprint") is not None:
        _tokenizer(m, str(expect["tokenizer_fingerprint"]), "as declared", problems)
    if expect.get("tokenizer") is not None:
        path = os.fspath(expect["tokenizer"])
        _tokenizer(m, tokenizer_fingerprint(path), path, problems)
    if expect.get("temperatures") is not None:
        missing = [
            float(t)
            for t in expect["temperatures"]
            if not any(abs(float(t) - c) <= _TOLERANCE for c in m.temperatures)
        ]
        if missing and m.topk:
            problems.append(
                f"temperatures: {missing} are not cached; the cache holds {m.temperatures}"
            )
        elif missing:
            problems.append("temperatures: the cache holds no top-k targets (topk = 0)")
    if expect.get("layers") is not None:
        missing_layers = sorted({int(x) for x in expect["layers"]} - set(m.hidden_layers))
        if missing_layers:
            problems.append(
                f"layers: teacher hidden layers {missing_layers} are not cached; the cache holds "
                f"{m.hidden_layers}"
            )
    if expect.get("topk") is not None and int(expect["topk"]) > m.topk:
        problems.append(f"topk: the run needs top-{expect['topk']}, the cache holds top-{m.topk}")
    if expect.get("seq_len") is not None and int(expect["seq_len"]) > m.seq_len:
        problems.append(
            f"seq_len: the run trains on {expect['seq_len']} positions, the cache rows hold "
            f"{m.seq_len}"
        )
    if problems:
        raise ManifestMismatchError(
            f"cache {m.cache_id} does not match what this run declares:\n  " + "\n  ".join(problems)
        )


def check_ensemble_expectations(
    manifests: Sequence[Manifest], sources: Sequence[str], expect: Mapping[str, Any] | None
) -> None:
    """:func:`check_expectations` for every cache of an ensemble, every mismatch named at once.

    Keys about what the run needs (vocabulary, tokenizer, temperatures, layers, top-k, length,
    dataset) hold for every teacher's cache. ``cache_id`` and ``teacher_fingerprint`` name one
    cache each, so an ensemble takes them as a list with one entry per cache (None: unchecked).
    """
    if not expect:
        return
    if len(manifests) == 1:
        check_expectations(manifests[0], expect)
        return
    n = len(manifests)
    for key in IDENTITY_KEYS:
        want = expect.get(key)
        if want is not None and (
            isinstance(want, (str, bytes)) or not isinstance(want, Sequence) or len(want) != n
        ):
            raise ValueError(
                f"expect[{key!r}]: an ensemble of {n} caches takes a list of {n} values (one per "
                f"cache, None to skip one), got {want!r}"
            )
    problems: list[str] = []
    for j, (m, src) in enumerate(zip(manifests, sources, strict=True)):
        mine = {k: v for k, v in expect.items() if k not in IDENTITY_KEYS}
        for key in IDENTITY_KEYS:
            if expect.get(key) is not None:
                mine[key] = expect[key][j]
        try:
            check_expectations(m, mine)
        except ManifestMismatchError as err:
            problems.append(f"teacher {j} ({src}): {err}")
    if problems:
        raise ManifestMismatchError("\n".join(problems))
