"""Teachers: HF loading, hooked hidden states vs HF's own, module teachers, errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdcache.core.errors import TeacherError
from kdcache.worker.teachers import (
    HFTeacher,
    ModuleTeacher,
    Teacher,
    load_teacher,
    resolve_device,
    resolve_dtype,
)


def spec(hf: object = None, module: str | None = None, dtype: str = "float32") -> SimpleNamespace:
    return SimpleNamespace(
        hf=None if hf is None else str(hf), module=module, dtype=dtype, device="cpu"
    )


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooked_hidden_states_equal_hf_output_hidden_states(
    arch: str, tiny_teacher_dir: Path, tiny_gpt2_dir: Path
) -> None:
    path = tiny_teacher_dir if arch == "llama" else tiny_gpt2_dir
    teacher = load_teacher(spec(path))
    assert isinstance(teacher, HFTeacher) and isinstance(teacher, Teacher)
    top = teacher.num_layers
    assert top is not None
    ids = torch.randint(0, teacher.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    layers = list(range(top + 1))
    hooks_before = _hook_count(teacher.model)  # HF registers some of its own
    out = teacher.forward(ids, layers)
    assert _hook_count(teacher.model) == hooks_before, "hooks must be removed after the forward"
    with torch.inference_mode():
        ref = teacher.model(ids, output_hidden_states=True, use_cache=False)
    assert len(ref.hidden_states) == top + 1
    assert sorted(out.hidden) == layers
    for i in layers:
        assert torch.equal(out.hidden[i], ref.hidden_states[i]), f"layer {i}"
    assert torch.equal(out.logits, ref.logits)


def test_only_requested_layers_are_captured(tiny_teacher_dir: Path) -> None:
    teacher = load_teacher(spec(tiny_teacher_dir))
    ids = torch.zeros((1, 4), dtype=torch.long)
    assert list(teacher.forward(ids, [1]).hidden) == [1]
    assert teacher.forward(ids, []).hidden == {}
    with pytest.raises(TeacherError, match=r"\[3\] out of range 0\.\.2"):
        teacher.forward(ids, [3])


def test_hf_teacher_metadata(tiny_teacher_dir: Path) -> None:
    teacher = load_teacher(spec(tiny_teacher_dir))
    assert (teacher.vocab_size, teacher.num_layers, teacher.hidden_size) == (320, 2, 32)
    assert teacher.max_positions == 128
    assert teacher.device == torch.device("cpu")
    assert str(tiny_teacher_dir) in teacher.description


def test_dtype_choice(tiny_teacher_dir: Path) -> None:
    teacher = load_teacher(spec(tiny_teacher_dir, dtype="bfloat16"))
    assert teacher.dtype == torch.bfloat16
    out = teacher.forward(torch.zeros((1, 3), dtype=torch.long), [1])
    assert out.logits.dtype == torch.bfloat16 and out.hidden[1].dtype == torch.bfloat16
    assert load_teacher(spec(tiny_teacher_dir, dtype="auto")).dtype == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_missing_teacher_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TeacherError, match="does not exist") as err:
        load_teacher(spec(missing))
    assert str(missing) in str(err.value)


def test_teacher_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="no config.json") as err:
        load_teacher(spec(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_unloadable_weights(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_teacher_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TeacherError, match="cannot load teacher") as err:
        load_teacher(spec(tmp_path))
    assert str(tmp_path) in str(err.value)
    assert err.value.__cause__ is None


def test_spec_must_name_one_source(tiny_teacher_dir: Path) -> None:
    with pytest.raises(TeacherError, match="exactly one"):
        load_teacher(spec())
    with pytest.raises(TeacherError, match="exactly one"):
        load_teacher(spec(tiny_teacher_dir, module="x:y"))


MODULE_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    V, D = 50, 8


    class LogitsOnly(nn.Module):
        def __init__(self, with_vocab: bool):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, D)
            self.out = nn.Linear(D, V)
            if with_vocab:
                self.vocab_size = V

        def forward(self, ids):
            return self.out(self.emb(ids))


    class WithHidden(LogitsOnly):
        num_layers = 2

        def forward(self, ids):
            h0 = self.emb(ids)
            h1 = h0 * 2
            h2 = h1 + 1
            return self.out(h2), (h0, h1, h2)


    def logits_only():
        return LogitsOnly(with_vocab=True)


    def probe_vocab():
        return LogitsOnly(with_vocab=False)


    def with_hidden():
        return WithHidden(with_vocab=True)


    def hf_model():
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        ))


    def not_a_module():
        return 42
    """
)
MOD = "kdc_test_teacher_module"


@pytest.fixture
def teacher_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / f"{MOD}.py").write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MOD, raising=False)
    return MOD


def test_module_teacher_logits_only(teacher_module: str) -> None:
    teacher = load_teacher(spec(module=f"{teacher_module}:logits_only"))
    assert isinstance(teacher, ModuleTeacher) and isinstance(teacher, Teacher)
    assert teacher.vocab_size == 50 and teacher.num_layers is None
    ids = torch.tensor([[1, 2, 3]])
    out = teacher.forward(ids, [])
    ref = teacher.module(ids)
    assert torch.equal(out.logits, ref) and out.hidden == {}
    with pytest.raises(TeacherError, match="returns no hidden states"):
        teacher.forward(ids, [1])


def test_module_teacher_probes_vocab(teacher_module: str) -> None:
    teacher = load_teacher(spec(module=f"{teacher_module}:probe_vocab"))
    assert isinstance(teacher, ModuleTeacher)
    assert not hasattr(teacher.module, "vocab_size")
    assert teacher.vocab_size == 50


def test_module_teacher_hidden_states(teacher_module: str) -> None:
    teacher = load_teacher(spec(module=f"{teacher_module}:with_hidden"))
    assert isinstance(teacher, ModuleTeacher) and teacher.num_layers == 2
    ids = torch.tensor([[4, 5]])
    out = teacher.forward(ids, [2, 0])
    emb = teacher.module.get_submodule("emb")(ids)
    assert sorted(out.hidden) == [0, 2]
    torch.testing.assert_close(out.hidden[0], emb, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden[2], emb * 2 + 1, rtol=0, atol=0)
    with pytest.raises(TeacherError, match="out of range"):
        teacher.forward(ids, [3])


def test_module_returning_hf_model_is_an_hf_teacher(teacher_module: str) -> None:
    teacher = load_teacher(spec(module=f"{teacher_module}:hf_model", dtype="bfloat16"))
    assert isinstance(teacher, HFTeacher)
    assert (teacher.vocab_size, teacher.num_layers, teacher.dtype) == (50, 2, torch.bfloat16)
    assert sorted(teacher.forward(torch.tensor([[1, 2]]), [0, 2]).hidden) == [0, 2]


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (
            "kdc_no_such_module_xyz:make",
            "cannot import teacher module 'kdc_no_such_module_xyz:make'",
        ),
        (f"{MOD}:missing", "has no callable 'missing'"),
        (f"{MOD}:not_a_module", "must return an nn.Module"),
        ("no_colon", "must look like"),
    ],
)
def test_module_teacher_errors(teacher_module: str, target: str, match: str) -> None:
    with pytest.raises(TeacherError, match=match):
        load_teacher(spec(module=target))


def test_accepts_the_core_teacher_spec(tiny_teacher_dir: Path) -> None:
    from kdcache.core.spec import TeacherSpec

    teacher = load_teacher(TeacherSpec(hf=str(tiny_teacher_dir), device="cpu"))
    assert teacher.vocab_size == 320 and teacher.dtype == torch.float32
