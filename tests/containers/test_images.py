"""The images built, run and checked end to end (``make test-containers``; rootful podman).

1. Both targets CI can build (sidecar, cpu) are built twice (first, then from the layer cache).
2. One pod runs the cpu image (vLLM + plugin on the tiny model and its LoRA, models read-only)
   and the sidecar image on one registry volume. Through the sidecar: register a vector, chat
   steered and unsteered (``steering`` field and ``NAME:svd``, streamed and not), hot-register a
   second version. Every answer must equal what the same requests get from vLLM and the sidecar
   run from this environment (the in-process stack ``make test`` runs).
3. The single-node Kubernetes manifests (the cpu overlay) run under ``podman kube play``, and the
   compose file's cpu profile under podman-compose, each answering a steered request.

Build times, image sizes, start-up and stop times go to ``benchmarks/results/containers.md``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from benchmarks.cpu_dtype import cpu_kind, cpu_model
from svd_vllm.core import artifact
from svd_vllm.tools.serve import vllm_command
from tests.support import podman as pm
from tests.support.artifacts import random_vector
from tests.support.child_servers import SidecarProcess, free_port, vllm_env
from tests.support.manifests import kustomize
from tests.support.vllm_server import VLLMServer

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        os.environ.get("SVD_TEST_CONTAINERS") != "1" or shutil.which("podman") is None,
        reason="the container lane: `make test-containers` (rootful podman)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "containers.md"
KUBE_CPU = ROOT / "deploy" / "k8s" / "cpu"
KEY = "c" * 32
SIDECAR, CPU = f"{pm.PREFIX}-sidecar:test", f"{pm.PREFIX}-cpu:test"
TAGS = {"sidecar": "svd-vllm-sidecar:0.1.0", "cpu": "svd-vllm-cpu:0.1.0"}  # what deploy/ names
PROMPT = "the color of sky is"
#: What the lane measured, written out at the end (module teardown).
MEASURED: dict[str, Any] = {"builds": [], "sizes": {}, "ready": {}, "stop": {}, "checks": []}


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _report_and_clean() -> Iterator[None]:
    leftovers = _kube_play_leftovers()
    pm.remove_everything(**leftovers)
    yield
    pm.remove_everything(**leftovers)
    _write_report()


def _kube_play_leftovers() -> dict[str, list[str]]:
    """What ``podman kube play`` of the cpu manifests makes outside the lane's prefix: a pod per
    Deployment, a volume per claim and per emptyDir, the Secret."""
    docs = kustomize(KUBE_CPU)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    return {
        "extra_pods": [f"{d['metadata']['name']}-pod-0" for d in deployments],
        "extra_volumes": [
            d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"
        ]
        + [
            v["name"]
            for d in deployments
            for v in d["spec"]["template"]["spec"]["volumes"]
            if "emptyDir" in v
        ],
        "secrets": [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"],
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    logs = tmp_path_factory.mktemp("build-logs")
    for target in ("sidecar", "cpu", "sidecar", "cpu"):  # the second round: the layer cache
        b = pm.build(target, TAGS[target], log=logs / f"{target}.log")
        MEASURED["builds"].append(b)
    for target, tag in TAGS.items():
        MEASURED["sizes"][target] = pm.image_size(tag)
        pm.podman("tag", tag, {"sidecar": SIDECAR, "cpu": CPU}[target])
    return {"sidecar": SIDECAR, "cpu": CPU}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout the deployment files mount at /models: base/, adapters/task/, vectors/."""
    from svd_vllm.tools.tiny import build_tiny_lora, build_tiny_model

    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "base", seed=0)
    build_tiny_lora(base, root / "adapters" / "task", seed=1)
    (root / "vectors").mkdir()
    for name, seed in (("v1", 5), ("v2", 6)):
        vec = random_vector(
            "task",
            vocab=256,
            seed=seed,
            spread=2.0,
            mu=-3.0,
            alpha=0.2,
            base_model="tiny",
            adapter="task",
        )
        artifact.save(vec, root / "vectors" / f"{name}.safetensors")
    (root / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)  # uid 1000 reads it
    return root


def _vllm_args(models: Path, port: int) -> list[str]:
    """The flags of the tests' vLLM (``VLLMServer``), for a model tree at ``models``."""
    cmd = vllm_command(
        models / "base",
        host="127.0.0.1",
        port=port,
        loras={"task": models / "adapters" / "task"},
        max_model_len=512,
        dtype="float32",
        extra=[
            "--enforce-eager",
            "--max-num-seqs",
            "16",
            "--chat-template",
            str(models / "chat.jinja"),
        ],
    )
    return cmd[4:]  # without `python -m svd_vllm.tools.vllm_cli serve` (the image's entry point)


def _sidecar_env(vllm_url: str, model_dir: Path, registry: Path) -> dict[str, str]:
    return {
        "SVD_SIDECAR_API_KEY": KEY,
        "SVD_SIDECAR_VLLM_URL": vllm_url,
        "SVD_SIDECAR_MODEL_DIR": str(model_dir),
        "SVD_SIDECAR_REGISTRY": str(registry),
    }


@pytest.fixture(scope="module")
def reference(models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The answers of vLLM and the sidecar run from this environment (no container)."""
    root = tmp_path_factory.mktemp("reference")
    registry = root / "registry"
    srv = VLLMServer(
        models / "base",
        {"task": models / "adapters" / "task"},
        registry,
        root / "vllm.log",
        extra_args=["--chat-template", str(models / "chat.jinja")],
    )
    sc = SidecarProcess(_sidecar_env(srv.base_url, models / "base", registry), root / "sc.log")
    try:
        srv.wait_ready()
        sc.start()
        return exercise(sc.url, models)
    finally:
        sc.stop()
        srv.stop()


# --- the requests, the same against every deployment ----------------------------------------
def _chat(c: httpx.Client, model: str, stream: bool, **extra: Any) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
        **extra,
    }
    if not stream:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return str(r.json()["choices"][0]["message"]["content"])
    parts = []
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    for e in events[:-1]:
        chunk = json.loads(e)
        assert chunk["model"] == model
        parts += [ch["delta"].get("content") or "" for ch in chunk["choices"]]
    return "".join(parts)


def _register(c: httpx.Client, vector: Path, *, replace: bool) -> int:
    r = c.post(
        "/v1/steering/vectors",
        params={"replace": "true"} if replace else None,
        headers={"Authorization": f"Bearer {KEY}"},
        data={"name": "task"},
        files={"file": ("task.safetensors", vector.read_bytes())},
    )
    assert r.status_code == 201, r.text
    return int(r.json()["version"])


def exercise(url: str, models: Path) -> dict[str, Any]:
    """Register v1; chat off / by field / by name, streamed and not; hot-register v2 and chat
    again. Returns every answer by label."""
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=120) as c:
        out["version1"] = _register(c, models / "vectors" / "v1.safetensors", replace=False)
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        out["models"] = sorted(i for i in ids if "/" not in i)  # not the base: a path
        for stream in (False, True):
            s = "stream" if stream else "plain"
            out[f"off/{s}"] = _chat(c, "task", stream)
            out[f"field/{s}"] = _chat(c, "task", stream, steering={"enabled": True})
            out[f"name/{s}"] = _chat(c, "task:svd", stream)
        out["version2"] = _register(c, models / "vectors" / "v2.safetensors", replace=True)
        out["name-v2/plain"] = _chat(c, "task:svd", False)  # the very next request
        out["field-v2/stream"] = _chat(c, "task", True, steering={"enabled": True})
    return out


def test_the_reference_is_steered(reference: dict[str, Any]) -> None:
    """The comparison below can fail: steering changes this answer, and v2 is another vector."""
    assert "task:svd" in reference["models"]
    assert reference["field/plain"] == reference["name/plain"] == reference["field/stream"]
    assert reference["off/plain"] == reference["off/stream"] != reference["field/plain"]
    assert reference["name-v2/plain"] == reference["field-v2/stream"] != reference["name/plain"]
    assert (reference["version1"], reference["version2"]) == (1, 2)


# --- the pod ----------------------------------------------------------------------------------
def _run_in_pod(
    pod: str, name: str, image: str, env: dict[str, str], volumes: list[str], *args: str
) -> None:
    """``podman run --detach`` of ``image`` as container ``name`` of ``pod``."""
    pm.podman(
        "run",
        "--detach",
        "--pod",
        pod,
        "--name",
        name,
        *[f"--env={k}={v}" for k, v in env.items()],
        *[f"--volume={v}" for v in volumes],
        image,
        *args,
    )


def test_pod_answers_equal_the_in_process_stack(
    images: dict[str, str], models: Path, reference: dict[str, Any]
) -> None:
    pod, vllm_port, sidecar_port = f"{pm.PREFIX}-pod", free_port(), free_port()
    vllm_c, sidecar_c, volume = f"{pod}-vllm", f"{pod}-sidecar", f"{pm.PREFIX}-registry"
    # Host networking: the pod's localhost is this machine's, and nothing leaves loopback.
    pm.podman("pod", "create", "--name", pod, "--network", "host", "--shm-size", "1g")
    pm.podman("volume", "create", volume)
    env = vllm_env(Path("/registry"))
    keep = (
        "VLLM_CPU_KVCACHE_SPACE",
        "HF_HUB_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "SVD_VLLM_REGISTRY",
        "VLLM_LOGGING_LEVEL",
    )
    sidecar_env = _sidecar_env(
        f"http://127.0.0.1:{vllm_port}", Path("/models/base"), Path("/registry")
    )
    sidecar_env |= {"SVD_SIDECAR_HOST": "127.0.0.1", "SVD_SIDECAR_PORT": str(sidecar_port)}
    t0 = time.monotonic()
    _run_in_pod(
        pod,
        vllm_c,
        images["cpu"],
        {k: env[k] for k in keep},
        [f"{models}:/models:ro", f"{volume}:/registry:ro"],
        *_vllm_args(Path("/models"), vllm_port),
    )
    _run_in_pod(
        pod,
        sidecar_c,
        images["sidecar"],
        sidecar_env,
        [f"{models}:/models:ro", f"{volume}:/registry"],
    )
    MEASURED["ready"]["sidecar"] = pm.wait_http(
        f"http://127.0.0.1:{sidecar_port}/healthz", 60, sidecar_c
    )
    pm.wait_http(f"http://127.0.0.1:{vllm_port}/health", 600, vllm_c)
    MEASURED["ready"]["cpu"] = time.monotonic() - t0
    for c in (vllm_c, sidecar_c):  # non-root, as the images say
        assert pm.podman("exec", c, "id", "-u").stdout.strip() == "1000"
    got = exercise(f"http://127.0.0.1:{sidecar_port}", models)
    assert got == reference
    MEASURED["checks"].append("pod: every answer (12 requests) equals the in-process stack's")
    health = pm.podman("healthcheck", "run", sidecar_c, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    MEASURED["checks"].append("pod: `podman healthcheck run` on the sidecar: healthy")
    MEASURED["stop"]["sidecar"] = pm.timed_stop(sidecar_c)
    MEASURED["stop"]["cpu"] = pm.timed_stop(vllm_c)
    assert MEASURED["stop"]["sidecar"] <= 5 and MEASURED["stop"]["cpu"] <= 5, MEASURED["stop"]
    pm.podman("pod", "rm", "--force", pod)
    pm.podman("volume", "rm", volume)


def test_the_sidecar_stops_promptly_under_an_init_too(
    images: dict[str, str], tmp_path: Path
) -> None:
    port, name = free_port(), f"{pm.PREFIX}-init"
    pm.podman(
        "run",
        "--detach",
        "--init",
        "--name",
        name,
        "--network",
        "host",
        "--env=SVD_SIDECAR_DEV=1",
        "--env=SVD_SIDECAR_VOCAB_SIZE=256",
        "--env=SVD_SIDECAR_HOST=127.0.0.1",
        f"--env=SVD_SIDECAR_PORT={port}",
        images["sidecar"],
    )
    pm.wait_http(f"http://127.0.0.1:{port}/healthz", 60, name)
    MEASURED["stop"]["sidecar --init"] = took = pm.timed_stop(name)
    assert took <= 5
    pm.podman("rm", "--volumes", name)  # with its anonymous /registry volume


# --- Kubernetes manifests and the compose file ------------------------------------------------
def _in_container(
    container: str, method: str, path: str, body: Any = None, port: int = 8100
) -> tuple[int, Any]:
    """An HTTP request made inside ``container`` to its own loopback (the pod's network)."""
    code = (
        "import json,sys,urllib.request as u,urllib.error as e\n"
        "m,p,b,k=sys.argv[1],sys.argv[2],sys.argv[3],sys.argv[4]\n"
        "r=u.Request('http://127.0.0.1:%s'%sys.argv[5]+p,method=m,data=b.encode() or None,"
        "headers={'Content-Type':'application/json','Authorization':'Bearer '+k})\n"
        "try:\n s=u.urlopen(r,timeout=120);print(s.status);print(s.read().decode())\n"
        "except e.HTTPError as x:\n print(x.code);print(x.read().decode())\n"
    )
    res = pm.podman(
        "exec",
        container,
        "python3",
        "-c",
        code,
        method,
        path,
        json.dumps(body) if body is not None else "",
        KEY,
        str(port),
        check=False,
    )
    if res.returncode != 0:
        return 0, res.stderr
    status, _, text = res.stdout.partition("\n")
    try:
        return int(status), json.loads(text)
    except ValueError:
        return int(status), text


def _steered_answers(container: str, port: int = 8100) -> dict[str, str]:
    """Greedy completions of the prompt through the sidecar: unsteered, steered by field, and
    steered by model name."""
    asks = (
        ("off", "task", {}),
        ("field", "task", {"steering": {"enabled": True}}),
        ("name", "task:svd", {}),
    )
    texts = {}
    for label, model, extra in asks:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
        status, out = _in_container(container, "POST", "/v1/completions", body, port)
        assert status == 200, out
        assert out["model"] == model
        texts[label] = out["choices"][0]["text"]
    return texts


def _wait_inside(container: str, path: str, timeout: float, port: int = 8100) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _in_container(container, "GET", path, port=port)[0] == 200:
            return time.monotonic() - t0
        time.sleep(2)
    logs = pm.podman("logs", "--tail", "40", container, check=False)
    raise AssertionError(
        f"{container}{path} not ready in {timeout:.0f} s:\n{logs.stdout}{logs.stderr}"
    )


def test_kube_play_of_the_single_node_manifests_answers_a_steered_request(
    images: dict[str, str], models: Path, tmp_path: Path
) -> None:
    docs = kustomize(KUBE_CPU)
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    # podman 4.3: the PVCs first (they become volumes), filled; then the Deployment alone.
    (tmp_path / "pvc.yaml").write_text(yaml.safe_dump_all(by_kind["PersistentVolumeClaim"]))
    pm.podman("kube", "play", str(tmp_path / "pvc.yaml"))
    deployment = by_kind["Deployment"][0]
    spec = deployment["spec"]["template"]["spec"]
    claim = next(
        v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if v["name"] == "models"
    )
    pm.podman(
        "run",
        "--rm",
        "--user=0",
        f"--volume={models}:/src:ro",
        f"--volume={claim}:/dst",
        "--entrypoint",
        "sh",
        images["sidecar"],
        "-c",
        "cp -a /src/. /dst/",
    )
    # The Secret as a podman secret: podman 4.3 mis-reads Secret documents, and reads a secret
    # as a JSON map of key -> base64 value. The key is the test's, in place of the placeholder.
    secret = by_kind["Secret"][0]
    keys = {k: base64.b64encode(KEY.encode()).decode() for k in secret["stringData"]}
    (tmp_path / "secret.json").write_text(json.dumps(keys))
    pm.podman("secret", "create", secret["metadata"]["name"], str(tmp_path / "secret.json"))
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump_all(by_kind["Deployment"]))
    pm.podman("kube", "play", str(tmp_path / "deployment.yaml"), timeout=600)
    # podman 4.3 makes each emptyDir a plain root-owned volume (Kubernetes' are world-writable):
    # vLLM, as uid 1000, cannot create its shared memory there until it is opened up, and its
    # container restarts until then.
    for volume in [v["name"] for v in spec["volumes"] if "emptyDir" in v]:
        where = pm.podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout
        Path(where.strip()).chmod(0o1777)
    # podman names a Deployment's pod <name>-pod-<n>, and its containers <pod>-<container>.
    sidecar_c = f"{deployment['metadata']['name']}-pod-0-sidecar"
    _wait_inside(sidecar_c, "/readyz", 600)
    status, out = _in_container(
        sidecar_c,
        "POST",
        "/v1/steering/vectors",
        {"path": "/models/vectors/v1.safetensors", "name": "task"},
    )
    assert status == 201, out
    got = _steered_answers(sidecar_c)
    assert got["name"] == got["field"] != got["off"], got
    MEASURED["checks"].append(
        f"kube play (deploy/k8s/cpu): steered {got['field']!r} (by field and "
        f"by name) != unsteered {got['off']!r}"
    )
    pm.podman("kube", "down", str(tmp_path / "deployment.yaml"), check=False)


def _completion(c: httpx.Client, model: str, **extra: Any) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return str(r.json()["choices"][0]["text"])


def test_compose_cpu_profile_answers_a_steered_request(
    images: dict[str, str], models: Path, tmp_path: Path
) -> None:
    """deploy/docker-compose.yml as a user runs it (podman-compose, the cpu profile), its ports
    published on loopback only; the file is copied as it is beside a sidecar.env of the test's."""
    compose = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    project = tmp_path / "deploy"
    project.mkdir()
    shutil.copy(ROOT / "deploy" / "docker-compose.yml", project / "docker-compose.yml")
    (project / "sidecar.env").write_text(f"SVD_SIDECAR_API_KEY={KEY}\n")
    vllm_port, sidecar_port = free_port(), free_port()
    env = os.environ | {
        "MODELS_DIR": str(models),
        "ADAPTERS_DIR": str(models / "adapters"),
        "VECTORS_DIR": str(models / "vectors"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_PUBLISH": f"127.0.0.1:{vllm_port}",
        "SIDECAR_PUBLISH": f"127.0.0.1:{sidecar_port}",
    }
    cmd = [
        compose,
        "--project-name",
        f"{pm.PREFIX}-compose",
        "--file",
        str(project / "docker-compose.yml"),
        "--profile",
        "cpu",
    ]

    def run(*args: str) -> None:
        res = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (
            f"podman-compose {args}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        )

    try:
        run("up", "--detach", "--no-build")
        pm.wait_http(f"http://127.0.0.1:{sidecar_port}/healthz", 60)
        pm.wait_http(f"http://127.0.0.1:{vllm_port}/health", 600)
        with httpx.Client(base_url=f"http://127.0.0.1:{sidecar_port}", timeout=120) as c:
            r = c.post(
                "/v1/steering/vectors",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"path": "/vectors/v1.safetensors", "name": "task"},
            )
            assert r.status_code == 201, r.text
            off = _completion(c, "task")
            on = _completion(c, "task", steering={"enabled": True})
            assert _completion(c, "task:svd") == on != off, (off, on)
        MEASURED["checks"].append(
            f"podman-compose (--profile cpu): steered {on!r} != unsteered "
            f"{off!r}, by field and by name"
        )
    finally:
        run("down", "--volumes", "--timeout", "5")


def _write_report() -> None:
    if not MEASURED["builds"] or set(MEASURED["ready"]) != {"sidecar", "cpu"}:
        return  # a partial run (-k) keeps the full lane's report
    rows = []
    for target in ("sidecar", "cpu"):
        first, again = [b for b in MEASURED["builds"] if b.target == target][:2]
        rows.append(
            f"| {target} | {first.seconds:.0f} s ({first.cached_steps}/{first.steps} steps cached)"
            f" | {again.seconds:.1f} s ({again.cached_steps}/{again.steps}) "
            f"| {MEASURED['sizes'][target] / 1e6:.0f} MB "
            f"| {MEASURED['ready'][target]:.1f} s "
            f"| {MEASURED['stop'][target]:.2f} s |"
        )
    import torch

    cpu = f"{cpu_model()} ({cpu_kind()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()})"
    podman_version = pm.podman("--version").stdout.strip()
    lines = [
        "# The images, built and run (make test-containers)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu}, "
        f"{os.cpu_count()} cores, {podman_version} (rootful, runc, cgroupfs), base "
        f"`{pm.PYTHON_IMAGE}`. The first build is cold only on a fresh machine (its cached "
        "steps say how cold); the second is the layer cache's. Ready: `podman run` to the first "
        "200 (`/health` for vLLM on the tiny model, `/healthz` for the sidecar). Stop: `podman "
        "stop` (SIGTERM, 10 s grace).",
        "",
        "| target | build, first | build, again | image size | start to healthy | stop |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *[
            f"- `{k}` stop: {v:.2f} s"
            for k, v in MEASURED["stop"].items()
            if k not in ("sidecar", "cpu")
        ],
        *[f"- {c}" for c in MEASURED["checks"]],
        "",
        "The GPU target (`FROM vllm/vllm-openai`) cannot be pulled here; it runs the cpu "
        "target's lines byte for byte (tests/unit/test_deploy.py checks it).",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
