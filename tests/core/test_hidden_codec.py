"""Hidden-state codecs against float64 references: 8-bit codes within their per-token bounds,
fp8 bits equal to torch's float8_e4m3fn cast, and a pca basis that is the float64 principal
subspace, whose decoding is the projection onto the stored basis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.core.errors import SpecError
from kdcache.core.hidden_codec import (
    decode_fp8,
    decode_pca,
    decode_scaled,
    encode_fp8,
    encode_pca,
    encode_scaled,
    fit_pca,
    from_storage,
    parse_hidden_codec,
    to_storage,
)
from kdcache.core.spec import parse_spec


def _hidden(seed: int = 0, shape: tuple[int, ...] = (4, 6, 64)) -> np.ndarray:
    """Hidden-state-like values: a few large outlier features, varying token norms."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal(shape) * rng.uniform(0.1, 20.0, size=(*shape[:-1], 1))
    h[..., 3] *= 30.0  # an outlier channel, as real LLM activations have
    return h


def _rel_err(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-token relative L2 error against the float64 reference."""
    return np.linalg.norm(x - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def test_int8_within_half_a_step_of_the_reference() -> None:
    h = _hidden()
    codes, scale = encode_scaled(h.astype(np.float32), "int8")
    assert codes.dtype == np.int8 and codes.shape == h.shape
    assert scale.dtype == np.float32 and scale.shape == h.shape[:-1]
    back = decode_scaled(codes, scale, "int8")
    step = np.abs(h).max(-1) / 127.0
    np.testing.assert_allclose(scale, step, rtol=1e-6)
    # every value within half a step (plus float32 rounding of h itself)
    assert (np.abs(back - h) <= 0.5 * step[..., None] * (1 + 1e-5) + 1e-6 * np.abs(h)).all()
    assert np.abs(codes).max() == 127  # the token's largest value uses the full range
    assert _rel_err(back, h).max() < 0.5 * np.sqrt(h.shape[-1]) / 127 * 31  # crude upper bound
    assert _rel_err(back, h).mean() < 0.02


@pytest.mark.parametrize(("kind", "top"), [("int6", 31), ("int5", 15), ("int4", 7)])
def test_fewer_bit_ints_within_half_a_step(kind: str, top: int) -> None:
    h = _hidden()
    codes, scale = encode_scaled(h.astype(np.float32), kind)
    assert codes.dtype == np.int8 and np.abs(codes).max() == top  # the full range, no more
    back = decode_scaled(codes, scale, kind)
    step = np.abs(h).max(-1) / top
    np.testing.assert_allclose(scale, step, rtol=1e-6)
    assert (np.abs(back - h) <= 0.5 * step[..., None] * (1 + 1e-5) + 1e-6 * np.abs(h)).all()
    int8 = decode_scaled(*encode_scaled(h.astype(np.float32), "int8"), "int8")
    assert _rel_err(back, h).mean() > 2 * _rel_err(int8, h).mean()  # fewer bits, more error


def test_fp8_bits_equal_torch_float8_e4m3fn() -> None:
    x = np.concatenate(
        [
            np.linspace(-448, 448, 20001, dtype=np.float32),
            np.float32(2.0) ** np.arange(-12, 9, dtype=np.float32),  # subnormals and powers
            np.float32([0.0, -0.0, 2**-10, 3 * 2**-10, 0.0029296875]),  # ties to even
        ]
    )
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    got = encode_fp8(x)
    nz = want != 0x80  # torch keeps -0.0's sign; the codec writes +0 (same value)
    np.testing.assert_array_equal(got[nz], want[nz])
    ref = torch.from_numpy(want).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(decode_fp8(got), ref)


def test_fp8_relative_error_bound() -> None:
    h = _hidden(1)
    codes, scale = encode_scaled(h.astype(np.float32), "fp8")
    assert codes.dtype == np.uint8
    back = decode_scaled(codes, scale, "fp8")
    # e4m3 has 3 mantissa bits: a normal value is within 2**-4 relative of the reference;
    # values below the smallest normal (2**-6 * scale) within half a subnormal step
    tol = np.maximum(np.abs(h) * 2.0**-4, 2.0**-10 * scale[..., None]) * (1 + 1e-5)
    assert (np.abs(back - h) <= tol).all()
    assert _rel_err(back, h).mean() < 0.05


def test_zero_token_codes_to_zero() -> None:
    h = np.zeros((2, 8), np.float32)
    for kind in ("int8", "fp8"):
        codes, scale = encode_scaled(h, kind)
        assert (scale == 0).all() and (decode_scaled(codes, scale, kind) == 0).all()


def test_pca_basis_is_the_float64_principal_subspace() -> None:
    rng = np.random.default_rng(3)
    d, r = 48, 6
    mix = rng.standard_normal((d, d))
    h = rng.standard_normal((500, d)) * np.linspace(5.0, 0.1, d) @ mix + 7.0
    basis, mean = fit_pca(h, r)
    assert basis.shape == (r, d) and mean.shape == (d,) and basis.dtype == np.float32
    np.testing.assert_allclose(basis @ basis.T, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(mean, h.mean(0), rtol=1e-6, atol=1e-5)
    # reference: SVD of the centred data in float64
    _, _, vt = np.linalg.svd(h - h.mean(0), full_matrices=False)
    ref = vt[:r]
    np.testing.assert_allclose(np.abs(basis @ ref.T), np.eye(r), atol=1e-4)
    # deterministic sign: each row's largest entry is positive
    assert (basis[np.arange(r), np.abs(basis).argmax(1)] > 0).all()
    b2, m2 = fit_pca(h.copy(), r)
    assert np.array_equal(b2, basis) and np.array_equal(m2, mean)


def test_pca_reconstruction_is_the_projection_onto_the_stored_basis() -> None:
    h = _hidden(2, (3, 40, 32))
    basis, mean = fit_pca(h, 8)
    codes = encode_pca(h, basis, mean)
    assert codes.shape == (3, 40, 8)
    b64, m64 = basis.astype(np.float64), mean.astype(np.float64)
    projection = (h - m64) @ b64.T @ b64 + m64  # float64 reference
    np.testing.assert_allclose(decode_pca(codes, basis, mean), projection, rtol=1e-4, atol=1e-3)
    # and through the stored bfloat16 codes: within bf16's relative step of the codes
    stored = from_storage(to_storage(codes, "bfloat16"), "bfloat16")
    np.testing.assert_allclose(stored, codes, rtol=2**-8, atol=0)
    full = fit_pca(h, 32)
    np.testing.assert_allclose(decode_pca(encode_pca(h, *full), *full), h, rtol=1e-3, atol=1e-3)


def test_pca_refuses_rank_above_width_or_samples() -> None:
    with pytest.raises(ValueError, match="hidden width"):
        fit_pca(np.zeros((10, 4)), 5)
    with pytest.raises(ValueError, match="at least 6 tokens"):
        fit_pca(np.zeros((5, 8)), 6)


def test_bfloat16_storage_rounds_like_torch() -> None:
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_storage(x, "bfloat16"), want)


# ---- the spec -----------------------------------------------------------------------------------
def _spec(**outputs: object) -> dict:
    return {
        "teacher": {"hf": "/nonexistent"},
        "dataset": {"tokens": "/nonexistent.npy"},
        "outputs": {"topk": 4, "hidden_layers": [1], **outputs},
    }


@pytest.mark.parametrize("value", ["int8", "int6", "int5", "int4", "fp8", "pca:16", "exact"])
def test_spec_accepts_the_codecs(value: str) -> None:
    assert parse_spec(_spec(hidden_codec=value)).outputs.hidden_codec == value


@pytest.mark.parametrize("value", ["int3", "pca", "pca:0", "pca:-3", "pca:x", "PCA:4", 8])
def test_spec_names_the_field_and_the_bad_value(value: object) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(hidden_codec=value))
    problems = err.value.problems
    assert [p.field for p in problems] == ["outputs.hidden_codec"]
    if isinstance(value, str):
        assert repr(value) in problems[0].message


def test_spec_refuses_a_codec_without_hidden_layers() -> None:
    with pytest.raises(SpecError, match="hidden_codec 'int8'"):
        parse_spec(_spec(hidden_codec="int8", hidden_layers=[]))


def test_parse_normalises_pca_rank() -> None:
    assert parse_hidden_codec("pca:008").name == "pca:8"
    assert parse_hidden_codec("fp8").scaled and not parse_hidden_codec("pca:2").scaled
