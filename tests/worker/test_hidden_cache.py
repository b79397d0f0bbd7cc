"""Coded hidden states end to end (``outputs.hidden_codec``): caches written by the embedded
runner hold int8 / fp8 codes with per-token scales, or pca codes with the basis fitted on the
first rows; the client decodes them (locally and over HTTP), the bytes do not depend on batching
or on which worker wrote which shard, ``verify`` covers scales and basis, plain zarr opens all."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _net import serve

from kdcache.client import CacheDataset, HiddenProjector, LayerMap, TeacherCache, losses
from kdcache.core.hidden_basis import BASIS_RECORD_KEY
from kdcache.core.hidden_codec import fit_pca, from_storage
from kdcache.core.reader import CacheReader
from kdcache.core.resolve import resolve_job
from kdcache.core.spec import parse_spec
from kdcache.worker.runner import ShardRunner, open_writer, prepare_job, run_job

LAYERS = [1, 2]
RANK = 8


def _spec(teacher: Path, tokens: Path, codec: str, batch_size: int = 3, **outputs: object) -> dict:
    return {
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {
            "topk": 4,
            "hidden_layers": LAYERS,
            "hidden_codec": codec,
            "hidden_dtype": "float32" if codec == "exact" else "bfloat16",
            **outputs,
        },
        "batch_size": batch_size,
        "rows_per_shard": 4,
    }


@pytest.fixture(scope="module")
def caches(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> dict[str, str]:
    """codec -> a complete cache of the 8 x 16 tokens (two shards), the exact one in float32."""
    root = tmp_path_factory.mktemp("hidden-codecs")
    return {
        codec: run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, codec)), root)
        for codec in ("exact", "int8", "fp8", f"pca:{RANK}")
    }


def _exact(caches: dict[str, str], layer: int) -> np.ndarray:
    return CacheReader(caches["exact"]).read(f"hidden/{layer}", slice(None)).astype(np.float64)


def test_ids_and_versions(caches: dict[str, str], tiny_teacher_dir: Path, tokens_npy: Path) -> None:
    spec = _spec(tiny_teacher_dir, tokens_npy, "exact")
    del spec["outputs"]["hidden_codec"]
    assert resolve_job(parse_spec(spec)).cache_id == CacheReader(caches["exact"]).manifest.cache_id
    ids = {CacheReader(url).manifest.cache_id for url in caches.values()}
    assert len(ids) == 4  # a codec joins the id
    versions = {c: CacheReader(url).manifest.format_version for c, url in caches.items()}
    assert versions == {"exact": 1, "int8": 2, "fp8": 2, f"pca:{RANK}": 2}


@pytest.mark.parametrize(("codec", "levels"), [("int8", 127.0), ("fp8", 448.0)])
def test_8bit_caches_decode_within_their_bounds(
    caches: dict[str, str], codec: str, levels: float
) -> None:
    cache = TeacherCache(caches[codec])
    batch = cache.batch(np.arange(8), ["input_ids", "hidden"])
    assert set(batch) == {"row", "input_ids", "hidden_1", "hidden_2"}  # no internal scale keys
    for layer in LAYERS:
        ref = _exact(caches, layer)
        got = batch[f"hidden_{layer}"]
        assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape
        step = np.abs(ref).max(-1, keepdims=True) / levels
        err = np.abs(got.numpy() - ref)
        if codec == "int8":
            assert (err <= 0.5 * step * (1 + 1e-4) + 1e-6).all()
        else:  # 3 mantissa bits: 2**-4 relative, or half a subnormal step near zero
            assert (err <= np.maximum(np.abs(ref) * 2.0**-4, step * 2.0**-10) * 1.0001).all()
        rel = np.linalg.norm(got.numpy() - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert rel.mean() < (0.01 if codec == "int8" else 0.03), rel.mean()


def test_int4_cache_decodes_within_half_a_step(
    caches: dict[str, str], tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    url = run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, "int4")), tmp_path)
    g = zarr.open_group(url, mode="r")
    assert g["hidden/1"].dtype == np.int8 and g["hidden/1"].attrs["coding"] == "int4"
    assert int(np.abs(g["hidden/1"][:]).max()) == 7
    batch = TeacherCache(url).batch(np.arange(8), ["hidden"])
    for layer in LAYERS:
        ref = _exact(caches, layer)
        step = np.abs(ref).max(-1, keepdims=True) / 7.0
        assert (np.abs(batch[f"hidden_{layer}"].numpy() - ref) <= 0.5 * step * 1.0001 + 1e-6).all()


def test_pca_cache_holds_codes_in_the_basis_fitted_on_the_first_rows(
    caches: dict[str, str],
) -> None:
    url = caches[f"pca:{RANK}"]
    cache = TeacherCache(url)
    m = cache.manifest
    assert m.hidden_width == RANK and m.hidden_size == 32
    codes = cache.batch(np.arange(8), ["hidden_1"])["hidden_1"]
    assert codes.dtype == torch.bfloat16 and tuple(codes.shape) == (8, 16, RANK)
    ref = _exact(caches, 1)
    basis, mean = (t.numpy() for t in cache.hidden_basis(1))
    # the basis is the float64 principal basis of the first rows' (here: all 8 rows') states
    want_basis, want_mean = fit_pca(ref.astype(np.float32), RANK)
    np.testing.assert_allclose(np.abs(basis @ want_basis.T), np.eye(RANK), atol=2e-3)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
    # codes are the projection onto the stored basis (bf16-rounded)
    want_codes = (ref - mean) @ basis.T.astype(np.float64)
    np.testing.assert_allclose(codes.float().numpy(), want_codes, rtol=2**-8, atol=1e-4)
    # decode_hidden gives mean + codes @ basis at full width, the projection of the state
    full = TeacherCache(url, decode_hidden=True).batch(np.arange(8), ["hidden_1"])["hidden_1"]
    assert full.dtype == torch.float32 and tuple(full.shape) == ref.shape
    projection = want_codes @ basis.astype(np.float64) + mean
    scale = np.abs(projection).max()
    np.testing.assert_allclose(full.numpy(), projection, atol=scale * 2**-7)
    back = from_storage(CacheReader(url).read("hidden/1", slice(None)), "bfloat16")
    np.testing.assert_allclose(full.numpy(), back @ basis + mean, rtol=1e-5, atol=1e-5)


def test_inspect_and_plan_count_the_pca_basis_once(
    caches: dict[str, str], tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    from kdcache.core.inspect import inspect_cache

    info = inspect_cache(caches[f"pca:{RANK}"])
    m = CacheReader(caches[f"pca:{RANK}"]).manifest
    basis = {a["name"]: a for a in info["arrays"] if not a["per_row"]}
    assert sorted(basis) == sorted(name for name, _ in m.basis_arrays()) and basis
    for name, shape in m.basis_arrays():
        assert basis[name]["shape"] == list(shape)
        assert basis[name]["bytes"] >= 4 * int(np.prod(shape)) // 8  # float32, barely compressible
    assert info["bytes"] == sum(a["bytes"] for a in info["arrays"])


def test_hidden_losses_in_the_pca_basis(caches: dict[str, str]) -> None:
    cache = TeacherCache(caches[f"pca:{RANK}"])
    m = cache.manifest
    batch = cache.batch([0, 1], ["hidden"])
    layer_map = LayerMap.from_manifest(m)
    proj = HiddenProjector(layer_map, 24, m.hidden_width)
    states = [torch.randn(2, 16, 24, requires_grad=True) for _ in range(3)]
    loss = losses.hidden_losses(states, batch, LayerMap({1: 1, 2: 2}), projector=proj)
    loss.backward()
    want = torch.stack(
        [
            ((proj[s](states[s]) - batch[f"hidden_{t}"].float()) ** 2).mean()
            for s, t in ((1, 1), (2, 2))
        ]
    ).mean()
    torch.testing.assert_close(loss, want)
    assert states[1].grad is not None and proj[1].weight.grad is not None


def test_same_bytes_whatever_the_batching_or_the_worker_split(
    caches: dict[str, str], tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    for codec in ("int8", f"pca:{RANK}"):
        ref = CacheReader(caches[codec])
        other = CacheReader(
            run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, codec, 5)), tmp_path / "b5")
        )
        # two workers, each with its own teacher and writer, shard 1 first: the first fits and
        # publishes the basis, the second reads it
        spec = parse_spec(_spec(tiny_teacher_dir, tokens_npy, codec, 2))
        for shard in (1, 0):
            job = prepare_job(spec)
            ShardRunner(job, open_writer(job, str(tmp_path / "split"))).run_shard(shard)
        split = CacheReader(str(tmp_path / "split" / "caches" / ref.manifest.cache_id))
        assert split.is_complete and other.manifest.cache_id == ref.manifest.cache_id
        for reader in (other, split):
            for spec_ in ref.manifest.arrays():
                a, b = ref.read(spec_.name, slice(None)), reader.read(spec_.name, slice(None))
                assert np.array_equal(a, b), (codec, spec_.name)
            for name, _ in ref.manifest.basis_arrays():
                assert np.array_equal(ref.group[name][...], reader.group[name][...])
            assert all(c.ok for c in reader.verify())


def test_plain_zarr_opens_every_new_array(caches: dict[str, str]) -> None:
    g = zarr.open_group(caches["int8"], mode="r")
    assert g["hidden/1"].dtype == np.int8 and g["hidden/1"].attrs["coding"] == "int8"
    assert g["hidden_scale/1"].shape == (8, 16) and g["hidden_scale/1"].dtype == np.float32
    g = zarr.open_group(caches["fp8"], mode="r")
    assert g["hidden/2"].dtype == np.uint8 and g["hidden/2"].attrs["coding"] == "fp8"
    g = zarr.open_group(caches[f"pca:{RANK}"], mode="r")
    assert g["hidden/1"].shape == (8, 16, RANK) and g["hidden/1"].attrs["coding"] == f"pca:{RANK}"
    assert g["hidden_pca/1/basis"].shape == (RANK, 32) and g["hidden_pca/2/mean"].shape == (32,)


@pytest.mark.parametrize(
    ("codec", "array", "shard"),
    [("int8", "hidden_scale/2", 1), (f"pca:{RANK}", "hidden_pca/1/basis", 0)],
)
def test_verify_catches_a_changed_scale_or_basis(
    caches: dict[str, str], tmp_path: Path, codec: str, array: str, shard: int
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(caches[codec], copy)
    assert all(c.ok for c in CacheReader(str(copy)).verify())
    arr = zarr.open_array(copy / array, mode="r+")
    if array.endswith("basis"):
        arr[0, 0] = float(arr[0, 0]) + 1e-3  # well-formed bytes, wrong numbers
    else:
        arr[shard * 4, 3] = float(arr[shard * 4, 3]) * 1.5
    bad = [c for c in CacheReader(str(copy)).verify() if not c.ok]
    assert [c.shard for c in bad] == [shard]
    assert any(p.startswith(f"{array}: checksum mismatch") for p in bad[0].problems)
    from kdcache.cli.main import main

    assert main(["verify", str(copy)]) != 0


def test_a_basis_record_is_required(caches: dict[str, str], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(caches[f"pca:{RANK}"], copy)
    (copy / BASIS_RECORD_KEY).unlink()
    bad = [c for c in CacheReader(str(copy)).verify() if not c.ok]
    assert [c.shard for c in bad] == [0] and "never published" in bad[0].problems[0]


@pytest.fixture(scope="module")
def served(caches: dict[str, str], tiny_teacher_dir: Path, tokens_npy: Path) -> Iterator[str]:
    service = pytest.importorskip("kdcache.service")
    import httpx

    root = Path(caches["int8"]).parent.parent
    settings = service.Settings(root=str(root), admin_token="a-secret", worker_token="w-secret")
    with serve(service.create_app(settings)) as base:
        for codec in ("int8", f"pca:{RANK}"):
            spec = _spec(tiny_teacher_dir, tokens_npy, codec)
            r = httpx.post(
                f"{base}/v1/jobs", json=spec, headers={"Authorization": "Bearer a-secret"}
            )
            assert r.status_code in (200, 201) and r.json()["shards_done"] == 2, r.text
        yield base


@pytest.mark.parametrize("codec", ["int8", f"pca:{RANK}"])
def test_dataset_decodes_locally_and_over_http(
    caches: dict[str, str], served: str, codec: str
) -> None:
    local = caches[codec]
    url = f"{served}/v1/caches/{Path(local).name}"
    decode = codec.startswith("pca")
    want = TeacherCache(local, decode_hidden=decode).batch(np.arange(8), ["hidden"])
    for source in (local, url):
        ds = CacheDataset(source, fields=["hidden"], shuffle=False, decode_hidden=decode)
        rows = list(ds)
        assert [int(r["row"]) for r in rows] == list(range(8))
        for layer in LAYERS:
            got = torch.stack([r[f"hidden_{layer}"] for r in rows])
            assert got.dtype == torch.float32 and got.shape[-1] == 32
            assert torch.equal(got, want[f"hidden_{layer}"]), (source, layer)
    remote = TeacherCache(url)
    for layer in LAYERS:
        assert torch.equal(
            remote.batch([5], [f"hidden_{layer}"])[f"hidden_{layer}"],
            TeacherCache(local).batch([5], [f"hidden_{layer}"])[f"hidden_{layer}"],
        )
    if decode:
        assert torch.equal(remote.hidden_basis(2)[0], TeacherCache(local).hidden_basis(2)[0])


@pytest.mark.parametrize("codec", ["int8", "fp8", f"pca:{RANK}"])
def test_report_norms_decode_the_codes(caches: dict[str, str], codec: str) -> None:
    from kdcache.core.cachestats import cache_stats

    exact = cache_stats(CacheReader(caches["exact"])).hidden
    coded = cache_stats(CacheReader(caches[codec])).hidden
    assert set(coded) == {"1", "2"}
    tol = 0.02 if codec in ("int8", "fp8") else 0.5  # pca:8 of d=32 keeps most of the norm
    for layer in coded:
        assert coded[layer]["mean"] == pytest.approx(exact[layer]["mean"], rel=tol)


@pytest.mark.parametrize("decode", [False, True])
def test_kd_trainer_projects_into_the_pca_basis(caches: dict[str, str], decode: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.client.hf import KDConfig, _attach_projector

    ds = CacheDataset(caches[f"pca:{RANK}"], fields=["input_ids", "hidden"], decode_hidden=decode)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    _attach_projector(model, KDConfig(layer_map=LayerMap({1: 1, 2: 2})), ds)
    proj = model.kd_projector[1]
    assert (proj.in_features, proj.out_features) == (24, 32 if decode else RANK)


def test_pca_rank_above_the_teacher_width_is_refused(
    tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    from kdcache.core.errors import SpecError

    with pytest.raises(SpecError) as err:
        resolve_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, "pca:33")))
    [problem] = err.value.problems
    assert problem.field == "outputs.hidden_codec" and "hidden width 32" in problem.message
    assert resolve_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, "pca:32"))).cache_id
