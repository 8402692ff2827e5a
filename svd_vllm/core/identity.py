"""Identities that tie a steering vector to the model, adapter and tokenizer it was made for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["model_identity", "sha256_file", "tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the token -> id map and the special tokens: equal vocabularies, equal prints."""
    vocab = tokenizer.get_vocab()
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(directory: str | Path | None) -> str:
    """``<dir name>@<short sha256 of its config and weight files>``: stable across copies."""
    if directory is None:
        return "none"
    d = Path(directory)
    files = sorted(
        p
        for p in d.iterdir()
        if p.is_file() and (p.suffix in (".json", ".safetensors")) and not p.name.startswith(".")
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return f"{d.resolve().name}@{h.hexdigest()[:16]}"
