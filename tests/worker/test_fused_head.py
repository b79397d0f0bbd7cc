"""Fused LM head: the head applied per chunk of positions gives the arrays of the unfused pass."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdcache.core.format import ARRAY_INDICES, ARRAY_LOGPROBS, ARRAY_LOGSUMEXP
from kdcache.worker.extract import extract, extract_batches
from kdcache.worker.head import LMHead, hf_head
from kdcache.worker.teachers import HFTeacher, ModuleTeacher, load_teacher

TEMPS = (1.0, 0.5, 3.0)


def hf(path: Path, dtype: str = "float32") -> HFTeacher:
    t = load_teacher(SimpleNamespace(hf=str(path), module=None, dtype=dtype, device="cpu"))
    assert isinstance(t, HFTeacher)
    return t


def ids_for(vocab: int, rows: int = 3, t: int = 24, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, t)).astype(np.int32)


def run(teacher: Any, ids: np.ndarray, *, fused: bool, **kw: Any) -> dict[str, np.ndarray]:
    args: dict[str, Any] = {
        "topk": 10,
        "temperatures": TEMPS,
        "layers": [0, 1, teacher.num_layers or 0],
        "hidden_dtype": "float32",
        "index_dtype": np.uint16,
        "fused": fused,
    }
    args.update(kw)
    return extract(teacher, ids, **args)


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Equal keys; top-k ids equal but where two logits tie; values within float32 rounding."""
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose(a[ARRAY_LOGSUMEXP], b[ARRAY_LOGSUMEXP], rtol=1e-6, atol=1e-5)
    lp_a, lp_b = a[ARRAY_LOGPROBS].astype(np.float32), b[ARRAY_LOGPROBS].astype(np.float32)
    np.testing.assert_allclose(lp_a, lp_b, rtol=1e-3, atol=1e-3)  # float16 storage: 1 ulp
    differ = a[ARRAY_INDICES] != b[ARRAY_INDICES]
    assert differ.mean() < 0.01, "top-k ids differ beyond ties"
    np.testing.assert_allclose(lp_a[differ], lp_b[differ], atol=1e-3)  # ties only
    for k in a:
        if k.startswith("hidden/"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_equals_unfused(arch: str, tiny_teacher_dir: Path, tiny_gpt2_dir: Path) -> None:
    teacher = hf(tiny_teacher_dir if arch == "llama" else tiny_gpt2_dir)
    assert isinstance(teacher.head, LMHead)
    ids = ids_for(teacher.vocab_size)
    unfused = run(teacher, ids, fused=False)
    head_calls = count_calls(teacher.model.get_output_embeddings())
    for t_chunk in (None, 1, 7):
        fused = run(teacher, ids, fused=True, t_chunk=t_chunk)
        assert_same_arrays(fused, unfused)
    assert head_calls == [0], "the fused pass must never run the model's own (B, T, V) head"


def test_fused_matches_float64_reference(tiny_teacher_dir: Path) -> None:
    teacher = hf(tiny_teacher_dir)
    ids = ids_for(teacher.vocab_size, rows=2, t=16)
    got = run(teacher, ids, fused=True, t_chunk=5)
    with torch.inference_mode():
        z = teacher.model(torch.from_numpy(ids).long()).logits.double()
    lse = torch.stack([torch.logsumexp(z / t, -1) for t in TEMPS], -1).numpy()
    np.testing.assert_allclose(got[ARRAY_LOGSUMEXP], lse, rtol=1e-5)
    vals, idx = torch.topk(torch.log_softmax(z, -1), 10, dim=-1)
    np.testing.assert_allclose(got[ARRAY_LOGPROBS], vals.numpy(), atol=5e-3)
    assert (got[ARRAY_INDICES] == idx.numpy()).mean() > 0.99


def test_fused_batches_equal_unfused(tiny_teacher_dir: Path) -> None:
    teacher = hf(tiny_teacher_dir)
    ids = ids_for(teacher.vocab_size, rows=5, t=16)
    kw: dict[str, Any] = {
        "topk": 4,
        "temperatures": [1.0],
        "layers": [2],
        "hidden_dtype": "bfloat16",
        "index_dtype": np.int32,
    }
    a = extract_batches(teacher, ids, batch_size=2, fused=True, **kw)
    b = extract_batches(teacher, ids, batch_size=2, fused=False, **kw)
    assert a["hidden/2"].dtype == np.uint16 and a[ARRAY_INDICES].dtype == np.int32
    assert np.array_equal(a["hidden/2"], b["hidden/2"])
    assert_same_arrays(a, b)


def test_hidden_only_job_skips_the_head(tiny_teacher_dir: Path) -> None:
    teacher = hf(tiny_teacher_dir)
    calls = count_calls(teacher.model.get_output_embeddings())
    ids = ids_for(teacher.vocab_size, rows=2, t=8)
    got = run(teacher, ids, fused=True, topk=0, layers=[2])
    assert sorted(got) == ["hidden/2"] and calls == [0]
    unfused = run(teacher, ids, fused=False, topk=0, layers=[2])
    assert np.array_equal(got["hidden/2"], unfused["hidden/2"])


def make_gemma2(path: Path, softcap: float) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        final_logit_softcapping=softcap,
        initializer_range=0.5,
    )
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_logit_softcapping_is_replicated(tmp_path: Path) -> None:
    teacher = hf(make_gemma2(tmp_path / "gemma2", softcap=2.0))
    assert teacher.head is not None and teacher.head.softcap == 2.0
    ids = ids_for(teacher.vocab_size)
    fused, unfused = run(teacher, ids, fused=True), run(teacher, ids, fused=False)
    assert_same_arrays(fused, unfused)
    # the cap is visible: no cached logit z = logprob + lse exceeds it
    z = fused[ARRAY_LOGPROBS].astype(np.float32) + fused[ARRAY_LOGSUMEXP][..., :1]
    assert z.max() <= 2.0 + 1e-2


def test_head_config_transforms() -> None:
    lin = nn.Linear(4, 6)
    model = SimpleNamespace(
        get_output_embeddings=lambda: lin,
        config=SimpleNamespace(logit_scale=0.5, logits_scaling=4.0, final_logit_softcapping=None),
    )
    head = hf_head(model)  # type: ignore[arg-type]
    assert head is not None and head.scale == pytest.approx(0.125) and head.softcap is None
    h = torch.randn(2, 3, 4)
    torch.testing.assert_close(head(h), lin(h) * 0.125)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_head_into_a_buffer_equals_the_plain_head(bias: bool, softcap: float | None) -> None:
    """The CPU pass's reused logits buffer gives the float64 reference of the head's formula."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 12, bias=bias)
    head = LMHead(weight=lin.weight, bias=lin.bias, scale=0.5, softcap=softcap)
    h = torch.randn(2, 3, 8)
    buf = torch.full((10, 12), float("nan"))  # more rows than needed: only the first 6 are used
    with torch.inference_mode():
        got = head(h, out=buf)
        plain = head(h)
    b64 = None if lin.bias is None else lin.bias.detach().double()
    ref = torch.nn.functional.linear(h.double(), lin.weight.detach().double(), b64) * 0.5
    if softcap:
        ref = torch.tanh(ref / softcap) * softcap
    assert got.shape == (2, 3, 12) and got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert torch.isnan(buf[6:]).all()
    small = torch.empty(5, 12)  # too few rows: a fresh tensor, the buffer untouched
    with torch.inference_mode():
        assert head(h, out=small).data_ptr() != small.data_ptr()


def test_non_linear_heads_are_not_fused() -> None:
    class Int8Linear(nn.Linear):
        pass

    for head in (Int8Linear(4, 6), nn.Sequential(nn.Linear(4, 6)), nn.Linear(4, 6, device="meta")):
        model = SimpleNamespace(get_output_embeddings=lambda h=head: h, config=None)
        assert hf_head(model) is None  # type: ignore[arg-type]


SCALED_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    V, D = 60, 16


    class ScaledLlama(LlamaForCausalLM):
        # an architecture that transforms its logits after the head in a way kdcache cannot know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0 + 1.0
            return out


    def scaled_llama():
        torch.manual_seed(0)
        return ScaledLlama(LlamaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
            initializer_range=0.5,
        ))


    class Declared(nn.Module):
        def __init__(self, honest: bool):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, D)
            self.kdcache_head = nn.Linear(D, V)
            self.vocab_size, self.num_layers, self.honest = V, 2, honest

        def kdcache_features(self, ids):
            h0 = self.emb(ids)
            h1 = torch.tanh(h0)
            return h1 * 2, (h0, h1, h1 * 2)

        def forward(self, ids):
            h, hidden = self.kdcache_features(ids)
            z = self.kdcache_head(h)
            return (z if self.honest else z * 2), hidden


    def declared():
        return Declared(honest=True)


    def declared_wrongly():
        return Declared(honest=False)
    """
)


@pytest.fixture
def module_src(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "kdc_test_fused_module"
    (tmp_path / f"{name}.py").write_text(SCALED_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def module_teacher(target: str) -> Any:
    return load_teacher(SimpleNamespace(hf=None, module=target, dtype="float32", device="cpu"))


def test_unknown_logit_transform_falls_back_to_unfused(module_src: str) -> None:
    teacher = module_teacher(f"{module_src}:scaled_llama")
    assert isinstance(teacher, HFTeacher) and teacher.head is None
    ids = ids_for(teacher.vocab_size, rows=2, t=12)
    got = run(teacher, ids, fused=True)
    with torch.inference_mode():
        z = teacher.model(torch.from_numpy(ids).long()).logits.double()
    np.testing.assert_allclose(got[ARRAY_LOGSUMEXP][..., 0], torch.logsumexp(z, -1), rtol=1e-5)


def test_module_teacher_declares_its_head(module_src: str) -> None:
    teacher = module_teacher(f"{module_src}:declared")
    assert isinstance(teacher, ModuleTeacher) and teacher.head is not None
    ids = ids_for(teacher.vocab_size)
    calls = count_calls(teacher.module.kdcache_head)
    fused = run(teacher, ids, fused=True, t_chunk=5)
    assert calls == [0], "the module's own forward (full logits) must not run"
    assert_same_arrays(fused, run(teacher, ids, fused=False))


def test_module_teacher_with_a_wrong_declaration_runs_unfused(module_src: str) -> None:
    teacher = module_teacher(f"{module_src}:declared_wrongly")
    assert isinstance(teacher, ModuleTeacher) and teacher.head is None
    ids = ids_for(teacher.vocab_size, rows=1, t=6)
    got = run(teacher, ids, fused=True)
    with torch.inference_mode():
        z = teacher.module(torch.from_numpy(ids).long())[0].double()
    np.testing.assert_allclose(got[ARRAY_LOGSUMEXP][..., 0], torch.logsumexp(z, -1), rtol=1e-5)
