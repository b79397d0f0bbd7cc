"""examples/ssm_student.py at small size: a Mamba student distils from the tiny Llama teacher's
cache (top-k logits plus hidden states through learned projections) and its losses go down."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ssm_student.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ssm_student", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mean(history: list[dict[str, float]], key: str) -> float:
    return sum(h[key] for h in history) / len(history)


@pytest.mark.parametrize(("arch", "layer_map"), [("mamba", "learned"), ("mamba2", "uniform")])
def test_ssm_student_loss_decreases(
    example: ModuleType,
    cache_dir37: str,
    capsys: pytest.CaptureFixture[str],
    arch: str,
    layer_map: str,
) -> None:
    args = example.parse_args(
        ["--cache", cache_dir37, "--arch", arch, "--layer-map", layer_map, "--steps", "16",
         "--batch-size", "4", "--dim", "16", "--state-size", "8", "--lr", "1e-2"]
    )  # fmt: skip
    history = example.train(args, cache_dir37)
    out = capsys.readouterr().out
    name = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}[arch]
    assert f"student {name} 2 blocks, d=16" in out, out
    assert len(history) == 16 and all(h["hidden"] > 0 for h in history)
    first, last = history[:4], history[-4:]
    assert _mean(last, "kd") < 0.9 * _mean(first, "kd"), history
    assert _mean(last, "loss") < _mean(first, "loss"), history
    if layer_map == "learned":
        chosen = re.findall(r"student block (\d) <- teacher layer (\d) \((.*)\)", out)
        assert [c[0] for c in chosen] == ["1", "2"], out
        for _, layer, weights in chosen:
            row = dict(w.split(": ") for w in weights.split(", "))
            assert set(row) == {"1", "2"} and float(row[layer]) == 1.0  # hardened at 80%
    else:
        assert "student block <- teacher layer: {1: 1, 2: 2}" in out, out
