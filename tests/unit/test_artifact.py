"""The steering artifact: round trip, validation, corruption."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svd_vllm.core import artifact
from svd_vllm.core.artifact import ArtifactError, CalibrationStats, SteeringArtifact


def make(name: str = "vec", vocab: int = 32, **kw) -> SteeringArtifact:
    g = torch.Generator().manual_seed(0)
    fields = dict(
        name=name,
        base_model="tiny-base",
        adapter="tiny-lora",
        tokenizer_fingerprint="sha256:abc",
        mu_bar=-1.25,
        mu_bar_exact=-0.75,
        alpha=0.1,
        calibration=CalibrationStats(
            items=3,
            tokens=10,
            positions=9,
            mu_mean=-1.0,
            mu_median=-0.5,
            mu_std=2.0,
            estimators={"mean": -1.0, "pooled": -1.25},
        ),
    )
    fields.update(kw)
    return SteeringArtifact.create(torch.randn(vocab, generator=g), **fields)


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    art = make()
    path = artifact.save(art, tmp_path / "vec.safetensors")
    back = artifact.load(path)
    assert back.meta == art.meta
    assert back.shift.dtype == torch.float32
    assert torch.equal(back.shift, art.shift)
    assert back.shift.numpy().tobytes() == art.shift.numpy().tobytes()
    assert art.meta.content_hash.startswith("sha256:")
    # Saving the loaded artifact again keeps content and hash.
    again = artifact.load(artifact.save(back, tmp_path / "again.safetensors"))
    assert again.meta == art.meta and torch.equal(again.shift, art.shift)


def test_content_hash_covers_shift_and_settings_not_creation_time() -> None:
    a, b = make(), make()
    assert a.meta.content_hash == b.meta.content_hash  # created_at is not hashed
    assert make(mu_bar=-1.0).meta.content_hash != a.meta.content_hash
    c = SteeringArtifact.create(
        a.shift + 1e-6, **a.meta.model_dump(exclude={"content_hash", "vocab_size"})
    )
    assert c.meta.content_hash != a.meta.content_hash


def test_corrupted_data_is_refused(tmp_path: Path) -> None:
    path = artifact.save(make(), tmp_path / "vec.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # flip a bit inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        artifact.load(path)


def test_truncated_and_garbage_files_are_refused(tmp_path: Path) -> None:
    path = artifact.save(make(), tmp_path / "vec.safetensors")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        artifact.load(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a tensor file")
    with pytest.raises(ArtifactError, match=r"junk\.safetensors"):
        artifact.load(junk)
    with pytest.raises(ArtifactError, match="no such file"):
        artifact.load(tmp_path / "missing.safetensors")


def _rewrite(path: Path, tensors: dict, metadata: dict) -> None:
    save_file(tensors, str(path), metadata=metadata)


def _meta_of(art: SteeringArtifact) -> dict:
    return {
        "format": "svd-vllm-steering",
        "format_version": "1",
        "svd_vllm": art.meta.model_dump_json(),
    }


def test_validation_errors_name_the_problem(tmp_path: Path) -> None:
    art = make()
    p = tmp_path / "x.safetensors"

    _rewrite(p, {"shift": art.shift.double()}, _meta_of(art))
    with pytest.raises(ArtifactError, match=r"dtype torch\.float64"):
        artifact.load(p)

    _rewrite(p, {"shift": art.shift.reshape(4, 8)}, _meta_of(art))
    with pytest.raises(ArtifactError, match=r"shape \(4, 8\)"):
        artifact.load(p)

    _rewrite(p, {"shift": art.shift[:10].clone()}, _meta_of(art))
    with pytest.raises(ArtifactError, match="10 entries but metadata says vocab_size=32"):
        artifact.load(p)

    bad = art.shift.clone()
    bad[7] = float("nan")
    _rewrite(p, {"shift": bad}, _meta_of(art))
    with pytest.raises(ArtifactError, match=r"non-finite values \(first at index 7"):
        artifact.load(p)

    _rewrite(p, {"shift": art.shift, "extra": art.shift.clone()}, _meta_of(art))
    with pytest.raises(ArtifactError, match="exactly one tensor"):
        artifact.load(p)

    _rewrite(p, {"shift": art.shift}, {"format": "other", "format_version": "1"})
    with pytest.raises(ArtifactError, match="metadata 'format'"):
        artifact.load(p)

    _rewrite(p, {"shift": art.shift}, {**_meta_of(art), "format_version": "9"})
    with pytest.raises(ArtifactError, match="format_version '9' is not supported"):
        artifact.load(p)

    meta = json.loads(art.meta.model_dump_json())
    del meta["tokenizer_fingerprint"]
    _rewrite(p, {"shift": art.shift}, {**_meta_of(art), "svd_vllm": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="tokenizer_fingerprint: Field required"):
        artifact.load(p)

    meta = json.loads(art.meta.model_dump_json())
    meta["mu_bar"] = float("inf")
    _rewrite(p, {"shift": art.shift}, {**_meta_of(art), "svd_vllm": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="mu_bar"):
        artifact.load(p)

    meta = json.loads(art.meta.model_dump_json())
    meta["alpha"] = 0.0
    _rewrite(p, {"shift": art.shift}, {**_meta_of(art), "svd_vllm": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="alpha"):
        artifact.load(p)


def test_loading_checks_the_vocab_size_and_the_byte_limit(tmp_path: Path) -> None:
    path = artifact.save(make(), tmp_path / "vec.safetensors")
    with pytest.raises(ArtifactError, match="vocab_size 32 does not match the model's 64"):
        artifact.load(path, expected_vocab_size=64)
    with pytest.raises(ArtifactError, match="over the 100-byte limit"):
        artifact.load(path, max_bytes=100)
    assert artifact.validate(path, expected_vocab_size=32).name == "vec"


def test_create_refuses_bad_input() -> None:
    with pytest.raises(ArtifactError, match="non-finite"):
        SteeringArtifact.create(
            torch.tensor([1.0, float("inf")]),
            name="v",
            base_model="b",
            adapter="a",
            tokenizer_fingerprint="t",
            mu_bar=0.0,
        )
    with pytest.raises(ValueError, match="name"):
        make(name="../escape")
    with pytest.raises(ValueError, match="mu_bar"):
        make(mu_bar=float("nan"))


def test_save_is_atomic_and_refuses_tampered_meta(tmp_path: Path) -> None:
    art = make()
    target = tmp_path / "vec.safetensors"
    artifact.save(art, target)
    before = target.read_bytes()
    tampered = SteeringArtifact(shift=art.shift, meta=art.meta.model_copy(update={"mu_bar": 5.0}))
    with pytest.raises(ArtifactError, match="content_hash does not match"):
        artifact.save(tampered, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vec.safetensors"]  # no temp files left


def test_header_length_is_standard_safetensors(tmp_path: Path) -> None:
    """Other tools can read the file: the header is plain safetensors JSON."""
    path = artifact.save(make(), tmp_path / "vec.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["shift"]["dtype"] == "F32" and header["shift"]["shape"] == [32]
    assert header["__metadata__"]["format"] == "svd-vllm-steering"
