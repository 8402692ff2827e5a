"""The OpenAI front under a faulty upstream and malformed-but-parseable input.

Every case gets an answer a client can act on: a 4xx naming the field for a bad request, a 502
or 504 for a vLLM fault, an error event (and no ``[DONE]``) for a stream that breaks, a 408 for
a body that never arrives. The upstream here is a real socket server that misbehaves on purpose
(``tests/support/faulty_upstream.py``), so the faults are the ones httpx really raises.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svd_sidecar import SidecarSettings, create_app
from svd_sidecar.json_body import MAX_JSON_DEPTH

from tests.support.faulty_upstream import FaultyUpstream
from tests.support.sidecar_app import (
    AUTH,
    KEY,
    VOCAB,
    sidecar_process_env,
    sidecar_settings,
    snapshot,
    upload,
    vec_bytes,
)

GENERATION = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"]
PROXY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream(stall=3 * PROXY_TIMEOUT) as up:
        yield up


@pytest.fixture
def front(tmp_path: Path, upstream: FaultyUpstream) -> Iterator[dict[str, Any]]:
    """The sidecar app in front of the faulty upstream, with vectors ``a`` and ``b``."""
    settings = sidecar_settings(tmp_path, vllm_url=upstream.url, proxy_timeout=PROXY_TIMEOUT)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for name, seed in (("a", 1), ("b", 2)):
            assert upload(client, vec_bytes(name, seed=seed)).status_code == 201
        upstream.seen.clear()
        yield {"client": client, "upstream": upstream, "root": tmp_path / "reg"}


def post_raw(client: TestClient, path: str, text: str) -> Any:
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


# -- malformed but parseable bodies: a 400 naming the field, nothing sent upstream -------------
@pytest.mark.parametrize("path", [*GENERATION, "/tokenize", "/detokenize"])
@pytest.mark.parametrize(
    ("fragment", "field", "token"),
    [
        ('"temperature": NaN', "temperature", "NaN"),
        ('"top_p": Infinity', "top_p", "Infinity"),
        ('"top_p": -Infinity', "top_p", "-Infinity"),
        ('"vllm_xargs": {"svd_scale": 1e999}', "vllm_xargs.svd_scale", "1e999"),
        (
            '"messages": [{"role": "user", "content": [1, -1e400]}]',
            "messages[0].content[1]",
            "-1e400",
        ),
    ],
)
def test_non_finite_numbers_are_400s_naming_the_field(
    front: dict, path: str, fragment: str, field: str, token: str
) -> None:
    r = post_raw(front["client"], path, '{"model": "ok", "prompt": "x", ' + fragment + "}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "json" and error["message"].startswith(f"{field}: {token} ")
    assert front["upstream"].seen == []


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, 960, 966, 975, 980, 990])
def test_nesting_near_and_past_the_limit(front: dict, depth: int) -> None:
    """``depth`` levels of arrays inside the body's own object: at most ``MAX_JSON_DEPTH`` in
    all are forwarded; deeper ones (including the 966-980 that re-encoding used to crash on) are
    400s, and the connection keeps serving."""
    c = front["client"]
    r = post_raw(c, "/v1/completions", '{"model": "ok", "x": ' + "[" * depth + "]" * depth + "}")
    if depth + 1 <= MAX_JSON_DEPTH:
        assert r.status_code == 200, r.text
        assert front["upstream"].seen[-1][1]["model"] == "ok"
    else:
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert c.get("/healthz").status_code == 200


# -- upstream faults: 502 / 504, never a 500 -------------------------------------------------
@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("drop-after-headers", 502, "upstream"),
        ("stall-after-headers", 504, "upstream_timeout"),
        ("stall-before-headers", 504, "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("path", GENERATION)
def test_an_upstream_that_fails_its_answer_is_a_502_or_504(
    front: dict, path: str, model: str, status: int, code: str
) -> None:
    t0 = time.monotonic()
    r = front["client"].post(path, json={"model": model, "prompt": "x"})
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert time.monotonic() - t0 < 2 * PROXY_TIMEOUT + 1  # bounded by the proxy timeout
    kind = "timeout" if status == 504 else "dropped"
    assert f'kind="{kind}"' in front["client"].get("/metrics").text


def test_an_unreachable_upstream_is_a_502(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = SidecarSettings(
        dev=True, registry=tmp_path, vocab_size=VOCAB, vllm_url=f"http://127.0.0.1:{port}"
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream"


def _stream(client: TestClient, path: str, model: str) -> tuple[int, bytes]:
    with client.stream("POST", path, json={"model": model, "prompt": "x", "stream": True}) as s:
        return s.status_code, b"".join(s.iter_raw())


def _events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each complete SSE event."""
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.decode().splitlines())
        out.append((fields.get("event"), fields["data"]))
    return out


@pytest.mark.parametrize("model", ["abort-mid-stream", "stall-mid-stream"])
@pytest.mark.parametrize("path", GENERATION)
def test_a_broken_stream_ends_with_an_error_event_and_no_done(
    front: dict, path: str, model: str
) -> None:
    status, raw = _stream(front["client"], path, model)
    assert status == 200  # the headers had gone out before the fault
    events = _events(raw)
    assert raw.endswith(b"\n\n") and b"[DONE]" not in raw
    assert [json.loads(d)["choices"][0]["text"] for _, d in events[:2]] == ["t0", "t1"]
    assert len(events) == 3  # the partial third event was dropped, not passed on cut
    name, data = events[2]
    error = json.loads(data)
    want = "upstream_timeout" if model == "stall-mid-stream" else "upstream"
    if path == "/v1/messages":  # Anthropic's shape
        assert name == "error" and error["type"] == "error"
        assert error["error"]["type"] == ("timeout_error" if "stall" in model else "api_error")
    elif path == "/v1/responses":
        assert name == "error" and error["type"] == "error" and error["code"] == want
    else:  # vLLM's ErrorResponse, as it sends one mid-stream
        assert name is None and error["error"]["type"] == want
        assert error["error"]["code"] == (504 if "stall" in model else 502)


def test_the_openai_sdk_raises_on_a_broken_stream(front: dict, upstream: FaultyUpstream) -> None:
    """What a real client makes of the error event: an exception, not a short answer."""
    from openai import APIError, OpenAI

    # TestClient is an httpx.Client: the SDK talks to the app through it.
    client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=front["client"])
    texts = []
    with pytest.raises(APIError, match=r"vLLM at .* failed in the middle of a stream"):
        for chunk in client.completions.create(model="abort-mid-stream", prompt="x", stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["t0", "t1"]
    whole = client.completions.create(model="ok", prompt="x", stream=True)
    assert [c.choices[0].text for c in whole] == ["t0", "t1", "t2"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_front_asks_for_identity_and_decodes_a_compressed_answer(
    front: dict, stream: bool
) -> None:
    c, up = front["client"], front["upstream"]
    if stream:
        status, raw = _stream(c, "/v1/completions", "gzip")
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n") and len(_events(raw)) == 4
    else:
        r = c.post("/v1/completions", json={"model": "gzip", "prompt": "x"})
        assert r.status_code == 200 and r.json() == {"ok": 1}
        assert "content-encoding" not in r.headers
    assert up.seen[-1][0]["accept-encoding"] == "identity"


# -- what reaches vLLM -----------------------------------------------------------------------
def test_internal_keys_and_steering_never_reach_vllm(front: dict) -> None:
    c, up = front["client"], front["upstream"]
    r = c.post(
        "/v1/completions",
        json={
            "model": "a",
            "prompt": "x",
            "vllm_xargs": {"svd_lora_name": "b", "svd_pinned": "b@1#0", "svd": 1, "other": 2},
        },
    )
    assert r.status_code == 200, r.text
    assert up.seen[-1][1]["vllm_xargs"] == {"svd": 1, "other": 2}
    r = c.post(
        "/v1/completions", json={"model": "a", "prompt": "x", "vllm_xargs": {"svd_pinned": "b@1#0"}}
    )
    assert r.status_code == 200 and "vllm_xargs" not in up.seen[-1][1]
    for path in ("/tokenize", "/detokenize"):
        r = c.post(path, json={"model": "a", "prompt": "x", "steering": {"enabled": True}})
        assert r.status_code == 200 and "steering" not in up.seen[-1][1]


# -- strict types: no coercion ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"steering": {"enabled": True, "scale": True}}, "steering.scale"),
        ({"steering": {"enabled": "yes"}}, "steering.enabled"),
        ({"steering": {"enabled": 1}}, "steering.enabled"),
        ({"steering": {"enabled": True, "alpha": "0.5"}}, "steering.alpha"),
        ({"steering": {"vectors": [{"name": "a", "scale": False}]}}, "steering.vectors.0.scale"),
        ({"steering": {"vector": 7}}, "steering.vector"),
        ({"vllm_xargs": ""}, "vllm_xargs"),
        ({"vllm_xargs": 0}, "vllm_xargs"),
        ({"vllm_xargs": False}, "vllm_xargs"),
        ({"vllm_xargs": [1]}, "vllm_xargs"),
        ({"vllm_xargs": {"svd": 1, "svd_scale": True}}, "vllm_xargs.svd_scale"),
        ({"vllm_xargs": {"svd": 1, "svd_alpha": False}}, "vllm_xargs.svd_alpha"),
        ({"vllm_xargs": {"svd": 2}}, "vllm_xargs.svd"),
    ],
)
def test_wrong_types_are_refused_not_coerced(front: dict, extra: dict, field: str) -> None:
    c = front["client"]
    before = snapshot(front["root"])
    r = c.post("/v1/completions", json={"model": "a", "prompt": "x", **extra})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert front["upstream"].seen == [] and snapshot(front["root"]) == before


def test_management_bodies_are_strict_too(front: dict) -> None:
    c = front["client"]
    before = snapshot(front["root"])
    r = c.patch("/v1/steering/vectors/a", json={"enabled": "yes"}, headers=AUTH)
    assert r.status_code == 422 and "enabled" in r.text
    r = c.patch("/v1/steering/vectors/a", json={"default_scale": True}, headers=AUTH)
    assert r.status_code == 422 and "default_scale" in r.text
    body = {"members": [{"vector": "a"}], "enabled": "no"}
    r = c.put("/v1/steering/compositions/c", json=body, headers=AUTH)
    assert r.status_code == 422 and "enabled" in r.text
    r = c.put(
        "/v1/steering/compositions/c",
        json={"members": [{"vector": "a", "scale": "2"}]},
        headers=AUTH,
    )
    assert r.status_code == 422 and "scale" in r.text
    assert snapshot(front["root"]) == before


# -- one rule with the engine: what the front forwards, the engine admits ---------------------
@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (
            {
                "steering": {"enabled": True, "vectors": [{"name": "a"}, {"name": "b"}]},
                "vllm_xargs": {"svd_scale": 2.0},
            },
            "steering",
            "svd_scale must be a list of 2 numbers",
        ),
        (
            {"steering": {"enabled": True, "vector": "a"}, "vllm_xargs": {"svd_scale": [1.0, 2.0]}},
            "steering",
            "svd_scale is a list",
        ),
        (
            {"steering": {"vectors": [{"name": "a"}, {"name": "zz"}]}},
            "unknown_vector",
            r"steering.vectors\[1\]: no steering vector named 'zz'",
        ),
        (
            {"steering": {"vectors": [{"name": "a", "scale": 2.0}, {"name": "zz"}]}},
            "unknown_vector",
            r"steering.vectors\[1\]: no steering vector named 'zz'",
        ),
        (
            {"vllm_xargs": {"svd": 1, "svd_vector": ["a", "zz"]}},
            "unknown_vector",
            r"vllm_xargs.svd_vector\[1\]: no steering vector named 'zz'",
        ),
        ({"vllm_xargs": {"svd": 1, "svd_vector": ["a", "a"]}}, "steering", "listed twice"),
    ],
)
def test_the_front_refuses_what_the_engine_refuses(
    front: dict, extra: dict, code: str, message: str
) -> None:
    import re

    r = front["client"].post("/v1/completions", json={"model": "a", "prompt": "x", **extra})
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert re.search(message, r.json()["error"]["message"]), r.text
    assert front["upstream"].seen == []


def test_models_report_a_composition_with_a_disabled_member(front: dict) -> None:
    c, up = front["client"], front["upstream"]
    r = c.put(
        "/v1/steering/compositions/ok",
        json={"members": [{"vector": "a"}, {"vector": "b"}]},
        headers=AUTH,
    )
    assert r.status_code == 200
    assert up.seen == []

    def listed() -> dict:
        return c.get("/v1/models").json()["data"][0]["svd_steering"]

    assert listed()["status"] == "ready" and listed()["problem"] is None
    c.patch("/v1/steering/vectors/b", json={"enabled": False}, headers=AUTH)
    info = listed()
    assert info["status"] == "disabled" and "'b' is disabled" in info["problem"]
    r = c.post(
        "/v1/completions", json={"model": "ok", "prompt": "x", "steering": {"enabled": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "disabled_vector"
    c.patch("/v1/steering/vectors/b", json={"enabled": True}, headers=AUTH)
    assert listed()["status"] == "ready"


def test_composition_versions_only_grow(front: dict) -> None:
    c = front["client"]
    body = {"members": [{"vector": "a"}]}
    versions = []
    for _ in range(2):
        versions.append(
            c.put("/v1/steering/compositions/x", json=body, headers=AUTH).json()["version"]
        )
    assert c.delete("/v1/steering/compositions/x", headers=AUTH).status_code == 204
    versions.append(c.put("/v1/steering/compositions/x", json=body, headers=AUTH).json()["version"])
    assert versions == [1, 2, 3]


# -- slow and vanishing clients (a real uvicorn sidecar) -------------------------------------
def _send_head(url: str, path: str, declared: int, sent: bytes, auth: bool) -> socket.socket:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = [
        f"PUT {path} HTTP/1.1" if "compositions" in path else f"POST {path} HTTP/1.1",
        f"Host: {u.hostname}:{u.port}",
        "Content-Type: application/json",
        f"Content-Length: {declared}",
    ]
    if auth:
        head.append(f"Authorization: Bearer {KEY}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + sent)
    return sock


def test_a_body_that_never_arrives_gets_a_408_and_a_vanishing_client_no_crash(
    tmp_path: Path,
) -> None:
    from tests.support.child_servers import SidecarProcess

    log = tmp_path / "sidecar.log"
    env = sidecar_process_env(tmp_path / "reg", body_timeout=1)
    sc = SidecarProcess(env, log).start()
    try:
        for path, auth in (
            ("/v1/completions", False),
            ("/v1/steering/compositions/x", False),
            ("/v1/steering/compositions/x", True),
        ):
            sock = _send_head(sc.url, path, 100, b'{"model": ', auth)
            t0 = time.monotonic()
            answer = b""
            try:
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    part = sock.recv(4096)
                    if not part:
                        break
                    answer += part
            finally:
                sock.close()
            assert answer.split(b" ", 2)[1] == b"408", (path, answer)
            assert b'"body_timeout"' in answer and time.monotonic() - t0 < 10
        for _ in range(3):  # clients that leave half-way through their body
            _send_head(sc.url, "/v1/completions", 100, b'{"model": ', False).close()
        time.sleep(0.5)
        import httpx

        assert httpx.get(f"{sc.url}/healthz", timeout=10).status_code == 200
        assert not list((tmp_path / "reg").glob("compositions*"))
    finally:
        sc.stop()
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


# -- a fuzz pass over the generation endpoints ------------------------------------------------
def _wild() -> Any:
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.sampled_from([0.5, 2.0, 1e9, -1e300]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["", "a", "b", "zz", "yes", "../x", "a\n"]),
    )
    return st.recursive(
        scalars,
        lambda kids: (
            st.lists(kids, max_size=3)
            | st.dictionaries(st.sampled_from(["name", "scale", "x"]), kids, max_size=2)
        ),
        max_leaves=6,
    )


def _bodies() -> Any:
    from hypothesis import strategies as st

    wild = _wild()
    steering = (
        st.dictionaries(
            st.sampled_from(["enabled", "vector", "vectors", "scale", "alpha", "colour"]), wild
        )
        | wild
    )
    xargs = (
        st.dictionaries(
            st.sampled_from(
                [
                    "svd",
                    "svd_vector",
                    "svd_scale",
                    "svd_alpha",
                    "svd_lora_name",
                    "svd_pinned",
                    "other",
                ]
            ),
            wild,
        )
        | wild
    )
    depth = st.sampled_from([0, MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, 966, 980])
    return st.fixed_dictionaries(
        {
            "model": st.sampled_from(["a", "b", "ok", "c"]),
            "path": st.sampled_from(GENERATION),
            "depth": depth,
        },
        optional={
            "steering": steering,
            "vllm_xargs": xargs,
            "temperature": wild,
            "stream": st.booleans(),
        },
    )


def test_fuzzing_the_generation_endpoints_finds_no_5xx(front: dict) -> None:
    from hypothesis import HealthCheck, given, settings

    c, root = front["client"], front["root"]
    before = snapshot(root)
    statuses: dict[int, int] = {}

    @settings(
        max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(_bodies())
    def one(case: dict) -> None:
        path, depth = case.pop("path"), case.pop("depth")
        if depth:
            case["nested"] = json.loads("[" * depth + "]" * depth) if depth < 900 else None
        text = json.dumps({**case, "prompt": "x"}, allow_nan=True)
        if depth >= 900:  # past json.dumps's own recursion budget: splice the text in
            text = text.replace('"nested": null', '"nested": ' + "[" * depth + "]" * depth)
        r = post_raw(c, path, text)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, text[:300], r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["code"], r.text

    one()
    assert snapshot(root) == before
    assert c.get("/healthz").status_code == 200
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 10, statuses  # both kinds seen


def test_a_real_sidecar_forwards_an_empty_bearer_as_a_valid_header(
    tmp_path: Path, upstream: FaultyUpstream
) -> None:
    """lm-evaluation-harness sends ``Authorization: Bearer `` when no key is set; a header the
    client to vLLM would refuse to send must not turn into a 502."""
    import http.client

    from tests.support.child_servers import SidecarProcess

    env = {
        "SVD_SIDECAR_DEV": "1",
        "SVD_SIDECAR_REGISTRY": str(tmp_path / "reg"),
        "SVD_SIDECAR_VOCAB_SIZE": str(VOCAB),
        "SVD_SIDECAR_VLLM_URL": upstream.url,
    }
    sc = SidecarProcess(env, tmp_path / "sidecar.log").start()
    try:
        # http.client, like requests, sends the trailing space (httpx itself refuses to).
        conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"model": "ok", "prompt": "x"}),
            headers={
                "Authorization": "Bearer ",
                "X-Request-Id": " r1 ",
                "Content-Type": "application/json",
            },
        )
        r = conn.getresponse()
        assert r.status == 200, r.read()
        conn.close()
        headers = upstream.seen[-1][0]
        assert headers["authorization"] == "Bearer" and headers["x-request-id"] == "r1"
    finally:
        sc.stop()


def test_a_client_that_leaves_mid_stream_closes_the_stream_to_vllm(
    tmp_path: Path, upstream: FaultyUpstream
) -> None:
    """vLLM aborts a request when its connection closes: the front must close its own as soon
    as its client leaves, not read (and keep vLLM generating) to the end. A real front: the
    in-process test client never disconnects."""
    from tests.support.child_servers import SidecarProcess

    env = sidecar_process_env(tmp_path / "reg", vllm_url=upstream.url)
    sc = SidecarProcess(env, tmp_path / "sidecar.log", args=["--role", "front"]).start()
    try:
        body = json.dumps({"model": "slow-stream", "prompt": "x", "stream": True}).encode()
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        upstream.left.clear()
        with socket.create_connection(("127.0.0.1", sc.port), timeout=10) as s:
            s.sendall(head.encode() + body)
            got = b""
            while got.count(b"data: {") < 2:
                got += s.recv(65536)
        left = time.monotonic()
        while not upstream.left and time.monotonic() < left + 3 * PROXY_TIMEOUT:
            time.sleep(0.05)
        assert b" 200 " in got.split(b"\r\n", 1)[0]
        # The upstream stream would have run 3 s; its connection closed well before.
        assert upstream.left and upstream.left[0] - left < 1.5, upstream.left
    finally:
        sc.stop()
