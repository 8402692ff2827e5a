"""The sidecar's per-app state: settings, the registry, metrics and the HTTP client to vLLM."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from svd_vllm.registry import Manifest, Registry, VectorEntry
from svd_vllm.registry.manifest_watcher import ManifestWatcher, file_signature
from svd_vllm.registry.request import XARGS_NAMES, ArgNames, SteeringRequest, check_request

from .aiohttp_transport import AiohttpTransport
from .errors import ApiError
from .metrics import SidecarMetrics
from .settings import SidecarSettings

__all__ = ["SidecarState"]


class SidecarState:
    """One per app (tests build many apps in one process; nothing here is global)."""

    def __init__(
        self, settings: SidecarSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.metrics = SidecarMetrics()
        self.client: httpx.AsyncClient | None = None
        self.transport = transport
        self._vocab: int | None = settings.vocab_size
        self._files = ManifestWatcher(self.registry)  # verifies each file once per change
        self._parsed: tuple[object, Manifest] | None = None  # (file signature, manifest)

    def admit(
        self, xargs: Mapping[str, Any], manifest: Manifest, names: ArgNames = XARGS_NAMES
    ) -> SteeringRequest:
        """vLLM admission's own rule (``check_request``) against this sidecar's registry and
        served vocab; ``SteeringError`` where the engine would refuse the request."""
        return check_request(xargs, manifest, self.problem, self._vocab, names=names)

    def manifest(self) -> Manifest:
        """The registry's manifest as the token path reads it: parsed again only when the file
        changed (one ``stat`` per request). ``RegistryError`` when it is unreadable: the
        sidecar answers 503 rather than steer with a manifest that is no longer there."""
        sig = file_signature(self.registry.manifest_path)
        if self._parsed is not None and self._parsed[0] == sig:
            return self._parsed[1]
        manifest = self.registry.manifest()
        self._parsed = (sig, manifest)
        return manifest

    def problem(self, entry: VectorEntry) -> str | None:
        """Why ``entry``'s file cannot serve, or None (the same check vLLM's admission makes)."""
        return self._files.problem(entry, self._vocab)

    def http(self) -> httpx.AsyncClient:
        """The client to vLLM (made by the lifespan; lazily if the app runs without one)."""
        if self.client is None:
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.proxy_timeout, connect=10),
                transport=self.transport or AiohttpTransport(),
            )
        return self.client

    async def vocab_size(self) -> int:
        """The served model's logits width: setting, model dir, or the model vLLM serves."""
        if self._vocab is not None:
            return self._vocab
        model_dir = self.settings.model_dir
        if model_dir is None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                r = await self.http().get(f"{self.settings.vllm_url}/v1/models", timeout=5)
                roots = [m.get("root") or m["id"] for m in r.json()["data"] if not m.get("parent")]
                model_dir = Path(roots[0]) if roots else None
        if model_dir is not None and (model_dir / "config.json").exists():
            cfg = json.loads((model_dir / "config.json").read_text())
            vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
            if isinstance(vocab, int) and vocab > 0:
                self._vocab = vocab
                return vocab
        raise ApiError(
            503,
            "vocab_unknown",
            "cannot determine the served model's vocab size: set SVD_SIDECAR_VOCAB_SIZE or "
            "SVD_SIDECAR_MODEL_DIR, or start vLLM",
        )
