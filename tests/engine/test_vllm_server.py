"""Through the vLLM OpenAI server with the installed plugin: parity, hot registration, 400s."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.registry import Registry
from tests.support.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(
    serving_assets: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VLLMServer, Registry]]:
    root = tmp_path_factory.mktemp("server")
    registry = Registry(root / "registry")
    registry.add(serving_assets["vectors"]["lora1"])
    registry.add(serving_assets["vectors"]["other"])
    srv = VLLMServer(
        serving_assets["base"], serving_assets["loras"], registry.root, root / "vllm.log"
    )
    try:
        srv.wait_ready()
        yield srv, registry
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as c:
        yield c


def ids(resp: httpx.Response) -> list[int]:
    assert resp.status_code == 200, resp.text
    return list(resp.json()["choices"][0]["token_ids"])


def _stream_ids(base_url: str, model: str, prompt: str, n: int) -> tuple[list[int], float]:
    """A steered greedy completion, streamed: its token ids and when its first token came."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    body |= {"return_token_ids": True, "vllm_xargs": {"svd": 1}}
    out: list[int] = []
    first = None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out += json.loads(line[6:])["choices"][0]["token_ids"]
                first = time.monotonic() if first is None else first
    assert first is not None, "no token streamed"
    return out, first


def wait_for_vector(
    srv: VLLMServer, client: httpx.Client, lora: str, timeout: float = 5.0
) -> float:
    """Seconds until a request for ``lora`` with svd=1 is admitted."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = srv.complete(client, model=lora, prompt="a", max_tokens=1, vllm_xargs={"svd": 1})
        if r.status_code == 200:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"vector for {lora} not live after {timeout}s")


def test_parity_with_the_reference_decoder(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    srv, _ = server
    a = serving_assets
    dec = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=a["vectors"]["lora1"])
    for prompt in ("the color of sky is", "what is the color of snow ? answer :"):
        on = ids(
            srv.complete(client, model="lora1", prompt=prompt, max_tokens=10, vllm_xargs={"svd": 1})
        )
        off = ids(
            srv.complete(client, model="lora1", prompt=prompt, max_tokens=10, vllm_xargs={"svd": 0})
        )
        plain = ids(srv.complete(client, model="lora1", prompt=prompt, max_tokens=10))
        assert on == dec.generate(prompt, "svd-precomputed", max_new_tokens=10).token_ids
        assert off == plain == dec.generate(prompt, "adapter", max_new_tokens=10).token_ids
        scaled = ids(
            srv.complete(
                client,
                model="lora1",
                prompt=prompt,
                max_tokens=10,
                vllm_xargs={"svd": 1, "svd_scale": 0.25},
            )
        )
        assert (
            scaled == dec.generate(prompt, "svd-precomputed", mu=-5.0, max_new_tokens=10).token_ids
        )


def test_a_base_request_batched_with_every_lora_equals_it_alone(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    """On vLLM's CPU backend a base row batched with LoRA rows read the last LoRA
    slot's weights when every slot was taken. ``vllm_command`` keeps one slot spare."""
    from concurrent.futures import ThreadPoolExecutor

    srv, _ = server
    prompt = "the color of sky is"

    def run(model: str) -> list[int]:
        return ids(
            srv.complete(
                client,
                model=model,
                prompt=prompt,
                max_tokens=64,
                min_tokens=64,
                vllm_xargs={"svd": 0},
            )
        )

    base = str(serving_assets["base"])  # vLLM serves the base model under its path
    alone = run(base)
    lora2_alone = run("lora2")
    assert lora2_alone != alone  # the adapter changes this output: the test can tell
    models = ["lora1", "lora2", base] * 5  # long, overlapping: batches with every adapter in
    with ThreadPoolExecutor(len(models)) as pool:
        outs = list(pool.map(run, models))
    for model, out in zip(models, outs, strict=True):
        if model == base:
            assert out == alone
        elif model == "lora2":
            assert out == lora2_alone


@pytest.mark.parametrize(
    ("xargs", "message"),
    [
        ({"svd": "maybe"}, "vllm_xargs.svd must be 1 or 0"),
        ({"svd": 1, "svd_vector": "nope"}, "no steering vector named 'nope'"),
        ({"svd": 1, "svd_scale": "abc"}, "svd_scale must be a number"),
        ({"svd": 1, "svd_scale": "NaN"}, "svd_scale must be finite"),
        ({"svd": 1, "svd_scale": 1e9}, "svd_scale must be within"),
        ({"svd": 1, "svd_alpha": 0}, "svd_alpha must be in (0, 1]"),
        ({"svd": 1, "svd_alpha": 2}, "svd_alpha must be in (0, 1]"),
    ],
)
def test_bad_arguments_get_400(server, client: httpx.Client, xargs: dict, message: str) -> None:
    srv, _ = server
    r = srv.complete(client, model="lora1", prompt="the sun is", max_tokens=2, vllm_xargs=xargs)
    assert r.status_code == 400, r.text
    assert message in r.text


def test_vocab_mismatch_and_missing_vector_get_400(server, client: httpx.Client) -> None:
    srv, registry = server
    g = torch.Generator().manual_seed(0)
    registry.add(
        SteeringArtifact.create(
            torch.randn(100, generator=g),
            name="small",
            base_model="x",
            adapter="y",
            tokenizer_fingerprint="t",
            mu_bar=-1.0,
        )
    )
    time.sleep(0.3)
    r = srv.complete(
        client,
        model="lora1",
        prompt="a",
        max_tokens=2,
        vllm_xargs={"svd": 1, "svd_vector": "small"},
    )
    assert r.status_code == 400 and "vocab_size 100 but the served model has 256" in r.text
    # lora2 has no vector yet: an explicit svd=1 is refused, the default is not.
    r = srv.complete(client, model="lora2", prompt="a", max_tokens=2, vllm_xargs={"svd": 1})
    assert r.status_code == 400 and "for this request's LoRA adapter" in r.text
    assert srv.complete(client, model="lora2", prompt="a", max_tokens=2).status_code == 200


def test_hot_registration_replace_and_in_flight_pinning(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    srv, registry = server
    a = serving_assets
    # Register lora2's vector while the server runs.
    registry.add(a["vectors"]["lora2"], replace=True)
    latency = wait_for_vector(srv, client, "lora2")
    assert latency < 1.5
    d2 = ReferenceDecoder(a["base"], a["loras"]["lora2"], vector=a["vectors"]["lora2"])
    prompt = "one two three"
    assert ids(
        srv.complete(client, model="lora2", prompt=prompt, max_tokens=8, vllm_xargs={"svd": 1})
    ) == (d2.generate(prompt, "svd-precomputed", max_new_tokens=8).token_ids)

    # A long request starts with lora1's current vector; mid-way lora1 is replaced by a
    # different one. On the tiny model the long request outlives the swap by about 2 s when
    # alone, and by less under load, so the swap can lose the race to its end: that attempt
    # proves nothing and is tried again, with the replacement as the version in flight.
    long_prompt, n_long = "the color of sky is", 480
    new_prompt = "the color of grass is"

    def long_request(result: dict, started: threading.Event) -> None:
        body = {
            "model": "lora1",
            "prompt": long_prompt,
            "max_tokens": n_long,
            "min_tokens": n_long,
            "temperature": 0,
            "stream": True,
            "return_token_ids": True,
            "vllm_xargs": {"svd": 1},
        }
        with (
            httpx.Client() as c,
            c.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=300) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    result["ids"] += json.loads(line[6:])["choices"][0]["token_ids"]
                    started.set()
        result["done"] = time.monotonic()

    current = a["vectors"]["lora1"]
    for attempt in range(5):
        result: dict = {"ids": []}
        started = threading.Event()
        t = threading.Thread(target=long_request, args=(result, started))
        t.start()
        assert started.wait(60), "the long request never started"
        source = a["vectors"]["other" if attempt % 2 == 0 else "lora1"]
        replacement = SteeringArtifact.create(
            source.shift,
            name="lora1",
            base_model="tiny",
            adapter="lora1",
            tokenizer_fingerprint="t",
            mu_bar=-6.0 - attempt,
            alpha=0.2,
        )
        registry.add(replacement, replace=True)
        # Admission pins the new version at once (the engine catches up synchronously): by the
        # new request's first streamed token it has been admitted, so that is the moment the
        # long request must outlive.
        new_ids, asked = _stream_ids(srv.base_url, "lora1", new_prompt, 8)
        t.join(timeout=300)
        assert "done" in result, "the long request did not finish"
        in_flight, pinned = result["done"] > asked, current
        current = replacement
        if in_flight:
            break
    assert in_flight, "in 5 attempts the long request always ended before the swap was tested"
    d1_new = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=replacement)
    assert new_ids == d1_new.generate(new_prompt, "svd-precomputed", max_new_tokens=8).token_ids
    # The in-flight request kept the version it started with, for all its tokens.
    d1 = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=pinned)
    expected_long = d1.generate(
        long_prompt, "svd-precomputed", max_new_tokens=n_long, stop_at_eos=False
    ).token_ids
    assert result["ids"] == expected_long


def test_compositions_in_a_mixed_batch_equal_each_request_alone(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    """On a real engine: list-valued ``vllm_xargs`` compose vectors; a batch mixing
    compositions, single vectors and unsteered requests gives each the tokens it gets alone,
    and a composition's tokens are the reference decoder's with the combined shift."""
    from concurrent.futures import ThreadPoolExecutor

    srv, registry = server
    a = serving_assets
    prompt = "the color of sky is"
    base = str(a["base"])
    requests = [
        {
            "model": "lora1",
            "vllm_xargs": {"svd": 1, "svd_vector": ["other", "lora1"], "svd_scale": [0.5, 1.0]},
        },
        {"model": "lora1", "vllm_xargs": {"svd": 1}},
        {"model": "lora1"},
        {
            "model": "lora1",
            "vllm_xargs": {"svd": 1, "svd_vector": ["lora1", "other"], "svd_alpha": 0.5},
        },
        {"model": base},
        {
            "model": "lora2",
            "vllm_xargs": {"svd": 1, "svd_vector": ["other", "lora1"], "svd_scale": [0.5, 1.0]},
        },
    ]

    def run(req: dict) -> list[int]:
        return ids(srv.complete(client, prompt=prompt, max_tokens=12, **req))

    alone = [run(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests * 2))
    assert together == alone * 2
    e_other, e_lora1 = registry.get("other"), registry.get("lora1")
    s_other, s_lora1 = registry.load(e_other).shift, registry.load(e_lora1).shift
    combined = e_other.strength(0.5) * s_other + e_lora1.strength(1.0) * s_lora1
    alpha = min(e_other.mask_alpha(), e_lora1.mask_alpha())
    dec = ReferenceDecoder(a["base"], a["loras"]["lora1"])
    assert (
        alone[0]
        == dec.generate(
            prompt, "svd-precomputed", mu=1.0, alpha=alpha, shift=combined, max_new_tokens=12
        ).token_ids
    )
    both = e_lora1.strength() * s_lora1 + e_other.strength() * s_other
    assert (
        alone[3]
        == dec.generate(
            prompt, "svd-precomputed", mu=1.0, alpha=0.5, shift=both, max_new_tokens=12
        ).token_ids
    )
    bad = srv.complete(
        client,
        model="lora1",
        prompt=prompt,
        max_tokens=2,
        vllm_xargs={"svd": 1, "svd_vector": ["other", "other"]},
    )
    assert bad.status_code == 400 and "svd_vector[1]: 'other' is listed twice" in bad.text


def test_corrupted_artifact_is_refused_by_name_never_served_stale(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    """On a real engine: a request that asks for a vector whose file is corrupt gets a
    400 naming the vector and the reason (not a quiet unsteered 200, and not the older version
    the manifest no longer names); unsteered requests keep working; a repair brings it back."""
    srv, registry = server
    a = serving_assets
    prompt = "a leaf is"
    good = registry.get("lora1")
    path = registry.root / good.file
    intact = path.read_bytes()
    data = bytearray(intact)
    data[-7] ^= 0x10  # one flipped bit in the tensor data, as disk corruption would
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        r = srv.complete(client, model="lora1", prompt=prompt, max_tokens=8, vllm_xargs={"svd": 1})
        assert r.status_code == 400, r.text
        assert "'lora1'" in r.text and "cannot be loaded" in r.text and "hash" in r.text
        plain = ids(srv.complete(client, model="lora1", prompt=prompt, max_tokens=8))
        d1 = ReferenceDecoder(a["base"], a["loras"]["lora1"])
        assert plain == d1.generate(prompt, "adapter", max_new_tokens=8).token_ids
    finally:
        path.write_bytes(intact)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    wait_for_vector(srv, client, "lora1")
    vec = registry.load(good)
    d1 = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=vec)
    assert (
        ids(srv.complete(client, model="lora1", prompt=prompt, max_tokens=8, vllm_xargs={"svd": 1}))
        == d1.generate(prompt, "svd-precomputed", max_new_tokens=8).token_ids
    )


def test_a_reset_registry_never_serves_the_old_content(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    """On a real engine: after the registry directory is deleted and a different
    vector is registered under the same name (version numbers restart at 1), vLLM steers with
    the new content, never the old one it still holds for the same name@version."""
    srv, registry = server
    a = serving_assets
    prompt = "the color of sky is"
    before = ids(
        srv.complete(client, model="lora1", prompt=prompt, max_tokens=10, vllm_xargs={"svd": 1})
    )
    old_version = registry.get("lora1").version
    shutil.rmtree(registry.root)
    fresh = Registry(registry.root)
    new = SteeringArtifact.create(
        -a["vectors"]["other"].shift,
        name="lora1",
        base_model="tiny",
        adapter="lora1",
        tokenizer_fingerprint="t",
        mu_bar=-8.0,
        alpha=0.2,
    )
    entry = fresh.add(new)
    assert entry.version <= old_version  # the same name@version can come back
    dec_new = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=new)
    expected = dec_new.generate(prompt, "svd-precomputed", max_new_tokens=10).token_ids
    assert expected != before  # the two contents steer differently here
    deadline = time.monotonic() + 5
    got = None
    while time.monotonic() < deadline:
        r = srv.complete(client, model="lora1", prompt=prompt, max_tokens=10, vllm_xargs={"svd": 1})
        if r.status_code == 200:
            got = ids(r)
            if got == expected:
                break
        time.sleep(0.1)
    assert got == expected
    fresh.add(a["vectors"]["other"])  # leave the module's registry as the other tests expect
