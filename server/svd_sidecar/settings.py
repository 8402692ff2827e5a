"""Sidecar settings, from the environment (``SVD_SIDECAR_*``) via pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from svd_vllm.registry import default_registry_path

__all__ = ["SidecarSettings"]


class SidecarSettings(BaseSettings):
    """Every ``SVD_SIDECAR_*`` setting (the field name, upper-cased, after the prefix)."""

    model_config = SettingsConfigDict(env_prefix="SVD_SIDECAR_", env_file=None, extra="ignore")

    role: Literal["all", "front", "management"] = Field(
        "all",
        description="what this process serves (--role overrides): `front` the OpenAI-compatible "
        "front only (stateless, reads the registry; any number of workers and replicas), "
        "`management` the steering API only (the registry's one writer), `all` both",
    )
    host: str = Field("127.0.0.1", description="address to listen on (--host overrides)")
    port: int = Field(8100, ge=1, le=65535, description="port to listen on (--port overrides)")
    api_key: SecretStr | None = Field(
        None, description="bearer key for mutations (required unless dev)"
    )
    dev: bool = Field(False, description="local development: allow mutations without a key")
    reads_require_key: bool = Field(False, description="also require the key for GET endpoints")
    registry: Path = Field(
        default_factory=default_registry_path,
        description="registry directory (default: SVD_VLLM_REGISTRY's, the engine's own)",
    )
    vllm_url: str = Field("http://127.0.0.1:8000", description="the vLLM OpenAI server")
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description='directories a path registration may read from (JSON: ["/models/vectors"])',
    )
    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest vector upload")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="largest request body elsewhere (OpenAI front): 413"
    )
    vocab_size: int | None = Field(None, gt=0, description="served model's logits width")
    model_dir: Path | None = Field(None, description="served model directory (to read vocab_size)")
    proxy_timeout: float = Field(
        600.0, gt=0, description="seconds vLLM may take to answer, or between two stream reads"
    )
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a client may take to send a request body: else 408"
    )
    shutdown_grace: int = Field(
        4,
        ge=0,
        description="seconds in-flight requests get to finish after SIGTERM (below "
        "docker/podman stop's 10 s, so the process always exits by itself)",
    )

    @model_validator(mode="after")
    def _key_or_dev(self) -> SidecarSettings:
        if self.api_key is None and not self.dev and self.role != "front":
            raise ValueError(
                "refusing to start: mutations need SVD_SIDECAR_API_KEY (or set SVD_SIDECAR_DEV=1 "
                "for a local development run without a key)"
            )
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 16:
            raise ValueError("SVD_SIDECAR_API_KEY must be at least 16 characters")
        return self
