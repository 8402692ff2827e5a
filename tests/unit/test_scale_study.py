"""The scale study's bookkeeping, without a model: what a LoRA built again must reproduce before
its likelihood scores are reused, which generation records are pending, and how the records of
the paper's protocol become the report's accuracies and CIs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from benchmarks import accuracy
from benchmarks import scale_study as ss
from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.offline.warmstart import RECORD

MODEL = "qwen2.5-coder-0.5b"
WARMSTART = {
    "examples": 1184,
    "steps": 148,
    "tokens": 11795,
    "first_loss": 5.5419,
    "last_loss": 3.5957,
    "mean_loss": 3.7093,
}


def _reported() -> dict[str, Any]:
    return {
        "adapter": "cs-lora-paper",
        "warmstart": dict(WARMSTART),
        "vector": {"mu_bar": -1.4963, "mu_bar_exact": -1.2714},
    }


def _again(mu_bar: float = -1.4963, **ws: float) -> tuple[dict[str, Any], Any]:
    vec = SimpleNamespace(meta=SimpleNamespace(mu_bar=mu_bar, mu_bar_exact=-1.2714))
    return {"result": WARMSTART | ws}, vec


def test_a_lora_built_again_within_float_noise_is_accepted_and_both_values_are_kept() -> None:
    ws, vec = _again(mu_bar=-1.4963 * 1.01, first_loss=5.543, last_loss=3.5957 * 0.995)
    out = ss.reproduction(_reported(), ws, vec)["values"]
    assert out["warmstart.first_loss"] == {"report": 5.5419, "again": 5.543, "rtol": 1e-2}
    assert out["vector.mu_bar"]["again"] == pytest.approx(-1.4963 * 1.01)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"examples": 1183}, "warmstart.examples"),  # one training example fewer: other data
        ({"mean_loss": 3.7093 * 1.05}, "warmstart.mean_loss"),  # another lr or seed
        ({"mu_bar": -1.4963 * 1.2}, "vector.mu_bar"),  # another calibration
    ],
)
def test_a_lora_that_is_not_the_reported_one_stops_the_run(
    change: dict[str, float], named: str
) -> None:
    ws, vec = _again(**change)
    with pytest.raises(SystemExit, match=named):
        ss.reproduction(_reported(), ws, vec)


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_generation_records_give_per_task_and_average_gains_and_say_what_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = ss.suites(MODEL, smoke=True)[0]
    assert suite.extra == {"tune": 3, "test": 4}  # the smoke sizes: 3 dev and 4 test items per set
    # every split: items 1-5 (the first 4 are answered), each with the options "A" and "X"
    monkeypatch.setenv("SVD_VLLM_CACHE", str(tmp_path / "cache"))
    for t in suite.test_tasks:
        rows = [
            {
                "id": i,
                "task": t,
                "prompt": "Q",
                "completion": " A",
                "options": [
                    {"text": " A", "correct": i != "2"},
                    {"text": " X", "correct": i == "2"},
                ],
            }
            for i in ("1", "2", "3", "4", "5")
        ]
        for split in ("test", "calib"):
            path = tmp_path / "cache" / "tasks" / t / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    where = tmp_path / suite.adapter
    assert ss._missing(tmp_path, [suite]) == [(suite.adapter, None)] + [
        (suite.adapter, t) for t in suite.test_tasks
    ]
    _write(
        where / "tune.json",
        {
            "dev_items": ["1", "2", "3"] * len(suite.calib_tasks),
            "n": 24,
            "seconds": 60.0,
            "first_token_note": "",
            "chosen": {"scale": 0.5, "reason": "r"},
            "points": [{"scale": s, "alpha": 0.1, "vs_adapter": None} for s in (0.0, 0.5, 1.0)],
        },
    )
    # Every task: PEFT right on 1 of 4 items; scale 1 on 2 of 4 (one answer changed); the tuned
    # scale 0.5 answers exactly as PEFT does.
    peft = {"scale": 0.0, "texts": ["A", "B", "C", "D"], "correct": [True, False, False, False]}
    for t in suite.test_tasks[:-1]:
        _write(
            where / f"gen-{t}.json",
            {
                "items": ["1", "2", "3", "4"],
                "seconds": 10.0,
                "points": [
                    peft,
                    peft | {"scale": 0.5},
                    {
                        "scale": 1.0,
                        "texts": ["A", "X", "C", "D"],
                        "correct": [True, True, False, False],
                    },
                ],
            },
        )
    assert ss._missing(tmp_path, [suite]) == [(suite.adapter, suite.test_tasks[-1])]
    last = suite.test_tasks[-1]
    _write(
        where / f"gen-{last}.json",
        json.loads((where / f"gen-{suite.test_tasks[0]}.json").read_text()),
    )
    assert ss._missing(tmp_path, [suite]) == []

    r = ss._summarise_generation(where, suite)
    assert r["tuned_scale"] == 0.5
    assert r["seconds"] == pytest.approx(60.0 + 10.0 * len(suite.test_tasks))
    row = r["tasks"][last]
    assert row["n"] == 4 and row["peft"] == 0.25 and row["+svd precomputed (calibrated)"] == 0.5
    assert (
        row["+svd precomputed (calibrated) changed"] == 1 and row["+svd (tuned scale) changed"] == 0
    )
    # answers "C" and "D" start with no option: PEFT is on an option for 1 of 4, scale 1 for 2
    assert (
        row["peft on an option"] == 0.25
        and row["+svd precomputed (calibrated) on an option"] == 0.5
    )
    assert r["average_on_an_option"]["+svd (tuned scale)"] == 0.25
    av = r["average_gain_vs_peft"]
    assert av["+svd precomputed (calibrated)"]["diff"] == pytest.approx(0.25)
    assert av["+svd (tuned scale)"]["diff"] == pytest.approx(0.0)
    assert av["+svd (tuned scale)"]["n"] == 4 * len(suite.test_tasks)

    # the report's table: a row per task and the average; one task alone has no average row
    table = ss.generation_table("t", r)
    assert len([x for x in table if x.startswith("| ")]) == 1 + len(suite.test_tasks) + 1
    assert table[-2] == (
        f"| **average** | {4 * len(suite.test_tasks)} | 25.0 | 50.0 | 25.0 | "
        f"{ss.format_ci(av['+svd precomputed (calibrated)'])} | "
        f"{ss.format_ci(av['+svd (tuned scale)'])} | 25 / 50 / 25 |"
    )
    one = r | {"tasks": {last: row}, "task_gain_vs_peft": {last: r["task_gain_vs_peft"][last]}}
    assert [x.split(" | ")[0] for x in ss.generation_table("t", one) if x.startswith("| ")] == [
        "| task",
        f"| {last}",
    ]

    # records of other items than the sizes ask for: tasks rebuilt with another seed, or sizes
    # changed since (one item more); refused, naming the file
    good = json.loads((where / f"gen-{last}.json").read_text())
    for items in (["1", "2", "3", "9"], ["1", "2", "3", "4", "5"]):
        _write(where / f"gen-{last}.json", good | {"items": items})
        with pytest.raises(SystemExit, match=f"gen-{last}.json holds answers to other items"):
            ss._summarise_generation(where, suite)


def test_reusing_likelihood_needs_a_report_of_the_same_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", MODEL, "--reuse-likelihood", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        ss.main(argv)
    assert e.value.code == 2 and "no report to reuse" in capsys.readouterr().err
    sizes = ss.SIZES[MODEL].__dict__ | {"test": 50}
    _write(tmp_path / f"accuracy-{MODEL}.json", {"sizes": sizes, "suites": []})
    with pytest.raises(SystemExit) as e:
        ss.main(argv)
    assert e.value.code == 2 and "other sizes" in capsys.readouterr().err


def test_a_suite_is_cached_exactly_when_the_study_reads_its_lora_and_vector_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_rebuild`` calls a LoRA reproduced only when it was built again; it asks
    ``accuracy.is_cached``, which must hold when (and only when) ``ensure_adapter`` and
    ``ensure_vector`` read the cache: here they get no model and no decoder to compute with."""
    monkeypatch.setenv("SVD_VLLM_CACHE", str(tmp_path))
    suite = accuracy.full_suites()[0]
    assert not accuracy.is_cached(MODEL, suite)
    record = {"config": {}, "result": WARMSTART, "base": MODEL}
    _write(accuracy.adapter_dir(MODEL, suite.adapter) / RECORD, record)
    vec = SteeringArtifact.create(
        torch.linspace(-1, 1, 16),
        name=suite.adapter,
        base_model=MODEL,
        adapter=suite.adapter,
        tokenizer_fingerprint="t",
        mu_bar=-1.5,
        alpha=0.2,
    )
    artifact.save(vec, accuracy.vector_path(MODEL, suite.adapter))
    assert not accuracy.is_cached(MODEL, suite)  # no calibration report yet: it is extracted again
    _write(accuracy.vector_report_path(MODEL, suite.adapter), {"mu_bar": -1.5})
    assert accuracy.is_cached(MODEL, suite)
    assert accuracy.ensure_adapter(None, MODEL, suite)[1] == record  # type: ignore[arg-type]
    got, report, seconds = accuracy.ensure_vector(None, MODEL, suite)  # type: ignore[arg-type]
    assert (got.meta.content_hash, report, seconds) == (
        vec.meta.content_hash,
        {"mu_bar": -1.5},
        0.0,
    )
