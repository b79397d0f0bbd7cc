"""Teacher placement: one device, or whole blocks in order across a worker's GPUs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdcache.core.errors import SpecError, TeacherError
from kdcache.core.spec import parse_spec
from kdcache.worker import teachers
from kdcache.worker.extract import extract
from kdcache.worker.placement import HEADROOM, Placement, placement, plan_device_map
from kdcache.worker.toy import make_tiny_teacher

GiB = 1 << 30


def gpus(n: int, size: int = 80 * GiB) -> dict[str, object]:
    return {"gpu_count": lambda: n, "gpu_bytes": lambda i: size}


def test_auto_uses_every_visible_gpu_only_when_there_are_several() -> None:
    assert placement("auto", **gpus(0)) == Placement(torch.device("cpu"))
    assert placement("auto", **gpus(1)) == Placement(torch.device("cuda:0"))
    two = placement("auto", **gpus(2))
    assert two.split and two.device == torch.device("cuda:0")
    assert two.max_memory == {0: int(80 * GiB * (1 - HEADROOM)), 1: int(80 * GiB * (1 - HEADROOM))}
    assert two.from_pretrained_kwargs()["device_map"] == "sequential"


def test_device_lists() -> None:
    p = placement(["cuda:3", "cuda:1"], **gpus(4))
    assert p.device == torch.device("cuda:1") and sorted(p.max_memory or {}) == [1, 3]
    assert placement(["cuda:2"], **gpus(4)) == Placement(torch.device("cuda:2"))
    assert placement("cuda:1", **gpus(0)) == Placement(torch.device("cuda:1"))  # as named
    with pytest.raises(TeacherError, match=r"cuda:4.*sees 4 GPU"):
        placement(["cuda:0", "cuda:4"], **gpus(4))
    with pytest.raises(TeacherError, match="cuda:N"):
        placement(["cpu", "cuda:0"], **gpus(4))


def test_spec_accepts_device_lists() -> None:
    base = {"teacher": {"hf": "/m"}, "dataset": {"tokens": "/t.npy"}}
    spec = parse_spec({**base, "teacher": {"hf": "/m", "device": ["cuda:0", "cuda:1"]}})
    assert spec.teacher.device == ["cuda:0", "cuda:1"]
    for bad in (["cpu"], [], ["cuda:0", "cuda:0"], "gpu"):
        with pytest.raises(SpecError, match="teacher.device"):
            parse_spec({**base, "teacher": {"hf": "/m", "device": bad}})


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_teacher(
        tmp_path_factory.mktemp("deep"), vocab_size=512, hidden_size=64, num_layers=6
    )


def test_split_keeps_blocks_whole_and_in_order(deep_teacher: Path) -> None:
    # fp32 weights: ~0.13 MiB embeddings + 6 blocks of ~0.2 MiB + head; 0.75 MiB per "GPU"
    dmap = plan_device_map(deep_teacher, torch.float32, {0: 3 << 18, 1: 3 << 18, 2: 3 << 18})
    assert set(dmap.values()) <= {0, 1, 2} and len(set(dmap.values())) >= 2
    blocks = {int(k.split(".")[2]): v for k, v in dmap.items() if k.startswith("model.layers.")}
    assert sorted(blocks) == list(range(6)), "each decoder block is placed whole"
    order = [blocks[i] for i in range(6)]
    assert order == sorted(order), "blocks fill the GPUs in order"
    everything = plan_device_map(deep_teacher, torch.float32, {0: 1 << 30, 1: 1 << 30})
    assert set(everything.values()) == {0}, "a teacher that fits on one GPU stays on it"


def test_a_teacher_too_large_is_refused(deep_teacher: Path) -> None:
    with pytest.raises(TeacherError, match="does not fit"):
        plan_device_map(deep_teacher, torch.float32, {0: 1 << 18, 1: 1 << 18})


def test_loading_through_a_device_map(deep_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU cannot hold a GPU split; the same loading path runs with every module on the CPU.
    spec = SimpleNamespace(hf=str(deep_teacher), module=None, dtype="float32", device="cpu")
    plain = teachers.load_teacher(spec)
    monkeypatch.setattr(
        teachers, "placement", lambda d: Placement(torch.device("cpu"), max_memory={0: GiB})
    )
    calls: list[dict[int, int]] = []

    def fake_map(path: str, dtype: torch.dtype, max_memory: dict[int, int]) -> dict[str, str]:
        calls.append(max_memory)
        return {"": "cpu"}

    monkeypatch.setattr(teachers, "plan_device_map", fake_map)
    split = teachers.load_teacher(spec)
    assert calls == [{0: GiB}]  # the split was planned for the placement's GPUs
    assert isinstance(split, teachers.HFTeacher) and split.head is not None
    ids = np.random.default_rng(0).integers(0, 512, size=(2, 12))
    kw = {"topk": 5, "temperatures": [1.0], "layers": [3, 6], "hidden_dtype": "float32"}
    a = extract(plain, ids, index_dtype=np.int32, **kw)  # type: ignore[arg-type]
    b = extract(split, ids, index_dtype=np.int32, **kw)  # type: ignore[arg-type]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_module_teachers_take_one_device() -> None:
    with pytest.raises(TeacherError, match="one device"):
        teachers._load_module("torch.nn:Identity", "float32", ["cuda:0", "cuda:1"])
