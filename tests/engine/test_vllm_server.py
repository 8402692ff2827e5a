"""Through the vLLM OpenAI server with the installed plugin: parity, hot registration, 400s."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.registry import Registry
from tests.support.artifacts import vector_from_shift
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
        serving_assets["base"],
        serving_assets["loras"],
        registry.root,
        root / "vllm.log",
        env={"VLLM_SERVER_DEV_MODE": "1"},  # /pause and /resume, for the pinning test
        extra_args=["--enable-log-requests"],  # an "Added request" line once admitted
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


def _stream_ids(base_url: str, model: str, prompt: str, n: int, out: list[int]) -> None:
    """A steered greedy completion of exactly ``n`` tokens, streamed: its ids go to ``out``."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 0}
    body |= {"stream": True, "return_token_ids": True, "vllm_xargs": {"svd": 1}}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out += json.loads(line[6:])["choices"][0]["token_ids"]


def _admitted(srv: VLLMServer) -> int:
    """Requests vLLM's frontend has handed to the engine (``--enable-log-requests`` logs each
    one after admission, where the plugin pins its vector version)."""
    return srv.log_path.read_text(errors="replace").count("Added request ")


def _wait_admitted(srv: VLLMServer, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _admitted(srv) < n:
        assert time.monotonic() < deadline, f"vLLM never admitted {n} requests"
        time.sleep(0.02)


def _lora1_vector(shift: torch.Tensor, mu: float) -> SteeringArtifact:
    """Another vector for lora1 (a replacement), around ``shift``."""
    return vector_from_shift(shift, "lora1", mu=mu, alpha=0.2, base_model="tiny", adapter="lora1")


def wait_for_vector(
    srv: VLLMServer, client: httpx.Client, lora: str, timeout: float = 30.0
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


def test_a_vector_registered_while_serving_goes_live(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    """lora2's vector, registered while the server runs, steers lora2's requests without a
    restart, exactly as the reference decoder does with it."""
    srv, registry = server
    a = serving_assets
    registry.add(a["vectors"]["lora2"], replace=True)
    wait_for_vector(srv, client, "lora2")
    d2 = ReferenceDecoder(a["base"], a["loras"]["lora2"], vector=a["vectors"]["lora2"])
    prompt = "one two three"
    assert ids(
        srv.complete(client, model="lora2", prompt=prompt, max_tokens=8, vllm_xargs={"svd": 1})
    ) == (d2.generate(prompt, "svd-precomputed", max_new_tokens=8).token_ids)


def test_a_request_admitted_before_a_replace_keeps_its_version_to_the_end(
    server, serving_assets: dict
) -> None:
    """With the engine paused (vLLM's dev-mode ``/pause?mode=keep``: requests are admitted and
    queue, none is scheduled), a long request is admitted under lora1's current vector, lora1
    is replaced, and a short one is admitted under the replacement, while the engine's own
    poller has already loaded it. On ``/resume`` both decode in the same batches: the long
    one keeps the version it was admitted with for all its tokens, the short one gets the new
    version, each exactly as the reference decoder does with it. Nothing here is a race: the
    order is fixed by the pause, not by timing."""
    srv, registry = server
    a = serving_assets
    pinned = a["vectors"]["lora1"]
    replacement = _lora1_vector(a["vectors"]["other"].shift, mu=-6.0)
    long_prompt, n_long = "the color of sky is", 480
    new_prompt, n_new = "the color of grass is", 8
    long_ids: list[int] = []
    new_ids: list[int] = []
    held = _admitted(srv)
    assert httpx.post(f"{srv.base_url}/pause", params={"mode": "keep"}, timeout=60).is_success
    with ThreadPoolExecutor(2) as pool:
        try:
            done = [pool.submit(_stream_ids, srv.base_url, "lora1", long_prompt, n_long, long_ids)]
            _wait_admitted(srv, held + 1)
            registry.add(replacement, replace=True)
            done.append(pool.submit(_stream_ids, srv.base_url, "lora1", new_prompt, n_new, new_ids))
            _wait_admitted(srv, held + 2)
            time.sleep(0.5)  # the engine's poller (every 0.2 s) loads the replacement meanwhile
        finally:
            assert httpx.post(f"{srv.base_url}/resume", timeout=60).is_success
        for f in done:
            f.result(timeout=600)
    d1 = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=pinned)
    want_long = d1.generate(
        long_prompt, "svd-precomputed", max_new_tokens=n_long, stop_at_eos=False
    )
    assert long_ids == want_long.token_ids
    d1_new = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=replacement)
    want_new = d1_new.generate(
        new_prompt, "svd-precomputed", max_new_tokens=n_new, stop_at_eos=False
    )
    assert new_ids == want_new.token_ids
    old = d1.generate(new_prompt, "svd-precomputed", max_new_tokens=n_new, stop_at_eos=False)
    assert new_ids != old.token_ids  # the two versions steer this prompt differently


def test_compositions_in_a_mixed_batch_equal_each_request_alone(
    server, serving_assets: dict, client: httpx.Client
) -> None:
    """On a real engine: list-valued ``vllm_xargs`` compose vectors; a batch mixing
    compositions, single vectors and unsteered requests gives each the tokens it gets alone,
    and a composition's tokens are the reference decoder's with the combined shift."""

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
    new = _lora1_vector(-a["vectors"]["other"].shift, mu=-8.0)
    entry = fresh.add(new)
    assert entry.version <= old_version  # the same name@version can come back
    dec_new = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=new)
    expected = dec_new.generate(prompt, "svd-precomputed", max_new_tokens=10).token_ids
    assert expected != before  # the two contents steer differently here
    deadline = time.monotonic() + 30  # the engine polls every 0.2 s; a loaded machine is slower
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
