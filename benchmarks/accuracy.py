"""The accuracy study: does a precomputed steering vector keep exact SVD's gain?

Runs on real models and real benchmarks, offline (``svd-vllm assets``), with the reference
decoder: for each suite (an adapter and its tasks) it warm-starts the adapter if it is not
cached, extracts and calibrates the vector on the calibration split, and scores ``base``,
``peft``, ``peft+svd-exact``, ``peft+svd-precomputed`` and ``peft+logit-bias`` on the test
split. Every difference to ``peft`` is paired (same items) with a 95% bootstrap CI.

    python -m benchmarks.accuracy            # full run (see SUITES for sizes)
    python -m benchmarks.accuracy --quick    # <= 10 minutes, a smoke-sized study

Writes ``benchmarks/results/accuracy-<model>[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from svd_vllm.core import artifact
from svd_vllm.offline.assets import cache_dir, ensure_model
from svd_vllm.offline.evaluation import (
    METHODS,
    average_gain_ci,
    evaluate_items,
    format_ci,
    method_specs,
    task_summary,
)
from svd_vllm.offline.extraction import CalibrationItem, extract_vector
from svd_vllm.offline.precision import DEVICES, DTYPES, resolve
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.tasks import COMMONSENSE, Item, build_tasks, load_items, tasks_dir
from svd_vllm.offline.warmstart import RECORD, WarmStartConfig, train_adapter

RESULTS = Path(__file__).resolve().parent / "results"
STEERED = ("peft+svd-exact", "peft+svd-precomputed", "peft+logit-bias")


@dataclass
class Suite:
    title: str
    adapter: str
    train_tasks: tuple[str, ...]
    train: WarmStartConfig
    train_per_task: int | None
    calib_tasks: tuple[str, ...]
    calib_per_task: int | None
    test_tasks: tuple[str, ...]
    test_per_task: int | None
    generation_tasks: tuple[str, ...] = ()
    generation_limit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on(
        cls,
        title: str,
        adapter: str,
        tasks: tuple[str, ...],
        train: WarmStartConfig,
        per_task: tuple[int | None, int | None, int | None] = (None, None, None),
        **more: Any,
    ) -> Suite:
        """A suite that warm-starts, calibrates and tests on the same tasks; ``per_task`` is the
        items per task of each split (train, calib, test; None: all)."""
        n_train, n_calib, n_test = per_task
        return cls(title, adapter, tasks, train, n_train, tasks, n_calib, tasks, n_test, **more)


def full_suites() -> list[Suite]:
    cs = tuple(COMMONSENSE)
    return [
        Suite.on(
            "Commonsense (8 sets), LoRA lr 3e-4, 1 epoch",
            "cs-lora-strong",
            cs,
            WarmStartConfig(lr=3e-4, max_length=256),
            (300, 40, 150),
            generation_tasks=("arc_easy", "arc_challenge"),
            generation_limit=100,
        ),
        Suite.on(
            "Commonsense (8 sets), LoRA lr 5e-5, 1 epoch (paper)",
            "cs-lora-paper",
            cs,
            WarmStartConfig(lr=5e-5, max_length=256),
            (150, 40, 100),
        ),
        Suite.on(
            "TruthfulQA, LoRA lr 3e-4, 3 epochs",
            "tqa-lora-strong",
            ("truthfulqa",),
            WarmStartConfig(lr=3e-4, epochs=3),
        ),
        Suite.on(
            "TruthfulQA, LoRA lr 5e-5, 1 epoch (paper)",
            "tqa-lora-paper",
            ("truthfulqa",),
            WarmStartConfig(lr=5e-5),
        ),
        Suite.on(
            "ARC-Easy, IA3 lr 3e-3",
            "ia3-arc_easy",
            ("arc_easy",),
            WarmStartConfig(method="ia3", lr=3e-3),
        ),
        Suite.on(
            "PIQA, IA3 lr 3e-3",
            "ia3-piqa",
            ("piqa",),
            WarmStartConfig(method="ia3", lr=3e-3),
            (300, None, 150),
        ),
    ]


def gemma_suites() -> list[Suite]:
    """Gemma-3-270M (base model, vocab 262144: every step is ~2.5x SmolLM2's on this CPU).

    Same tasks, prompts, splits and CI reporting as SmolLM2; fewer items per set so both warm
    starts (LoRA and IA3) fit in about 45 minutes of 2-core compute.
    """
    cs = tuple(COMMONSENSE)
    return [
        Suite.on(
            "Commonsense (8 sets), LoRA lr 3e-4, 1 epoch",
            "cs-lora-strong",
            cs,
            WarmStartConfig(lr=3e-4, max_length=256),
            (60, 15, 40),
        ),
        Suite.on(
            "ARC-Easy, IA3 lr 3e-3",
            "ia3-arc_easy",
            ("arc_easy",),
            WarmStartConfig(method="ia3", lr=3e-3),
            (None, 40, 120),
        ),
    ]


def suites_for(model: str, quick: bool) -> list[Suite]:
    if quick:
        return quick_suites()
    return gemma_suites() if model.startswith("gemma") else full_suites()


def quick_suites() -> list[Suite]:
    four = ("arc_easy", "piqa", "siqa", "obqa")
    return [
        Suite.on(
            "Commonsense (4 sets), quick LoRA lr 3e-4",
            "quick-lora",
            four,
            WarmStartConfig(lr=3e-4, max_length=256),
            (60, 10, 40),
        ),
    ]


def adapter_dir(model: str, name: str) -> Path:
    return cache_dir() / "adapters" / model / name


def vector_path(model: str, adapter: str) -> Path:
    """Where the steering vector extracted for one of ``model``'s adapters is cached (its
    calibration report sits beside it as ``<adapter>.report.json``)."""
    return cache_dir() / "vectors" / model / f"{adapter}.safetensors"


def vector_report_path(model: str, adapter: str) -> Path:
    return vector_path(model, adapter).with_suffix(".report.json")


def is_cached(model: str, suite: Suite) -> bool:
    """Whether ``suite``'s LoRA and vector (with its calibration report) are in the cache, so
    that ``ensure_adapter`` and ``ensure_vector`` read them instead of computing them."""
    return (
        (adapter_dir(model, suite.adapter) / RECORD).exists()
        and vector_path(model, suite.adapter).exists()
        and vector_report_path(model, suite.adapter).exists()
    )


#: ``--device``/``--dtype``/``--batch-size`` of this run (``main`` sets them; auto by default).
PLACEMENT: dict[str, Any] = {"device": "auto", "dtype": "auto", "batch_size": 64}


def ensure_adapter(model_dir: Path, model: str, suite: Suite) -> tuple[Path, dict[str, Any]]:
    out = adapter_dir(model, suite.adapter)
    info_path = out / RECORD
    if not info_path.exists():
        examples = []
        for t in suite.train_tasks:
            items = load_items(tasks_dir() / t / "train.jsonl", limit=suite.train_per_task)
            examples += [(it.gold_prompt(), it.completion) for it in items]
        print(f"[study] warm-starting {suite.adapter} on {len(examples)} examples", flush=True)
        cfg = replace(suite.train, device=PLACEMENT["device"], dtype=PLACEMENT["dtype"])
        train_adapter(model_dir, examples, out, cfg)
    return out, json.loads(info_path.read_text())


def ensure_vector(
    dec: ReferenceDecoder, model: str, suite: Suite
) -> tuple[Any, dict[str, Any], float]:
    path, rep = vector_path(model, suite.adapter), vector_report_path(model, suite.adapter)
    if path.exists() and rep.exists():
        return artifact.load(path), json.loads(rep.read_text()), 0.0
    items = []
    for t in suite.calib_tasks:
        its = load_items(tasks_dir() / t / "calib.jsonl", limit=suite.calib_per_task)
        items += [CalibrationItem(it.gold_prompt(), it.completion) for it in its]
    t0 = time.time()
    art, report = extract_vector(dec, items, name=suite.adapter, batch_size=PLACEMENT["batch_size"])
    seconds = time.time() - t0
    artifact.save(art, path)
    summary = report.summary() | {"seconds": seconds}
    rep.write_text(json.dumps(summary, indent=2))
    return art, summary, seconds


def score_cache_dir(model: str, suite: Suite) -> Path:
    """Where each task's per-item scores are kept, so that an interrupted study resumes."""
    return cache_dir() / "scores" / model / suite.adapter


def suite_test_items(suite: Suite, task: str) -> list[Item]:
    """The suite's test items of one task."""
    return load_items(tasks_dir() / task / "test.jsonl", limit=suite.test_per_task)


def evaluate_task(
    dec: ReferenceDecoder,
    vec: Any,
    suite: Suite,
    task: str,
    methods: Sequence[str],
    items: list[Item] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per-item scores of ``methods`` on one of the suite's test tasks (greedy generation too
    where the suite asks for it), uncached."""
    return evaluate_items(
        dec,
        suite_test_items(suite, task) if items is None else items,
        method_specs(vec, include=methods),
        generation=task in suite.generation_tasks,
        gen_limit=suite.generation_limit or None,
        desc=task,
        batch_size=PLACEMENT["batch_size"],
    )


def score_task(
    dec: ReferenceDecoder, vec: Any, model: str, suite: Suite, task: str
) -> dict[str, dict[str, list[float]]]:
    """Per-item scores of every method on one test task (cached per suite, task and vector)."""
    items = suite_test_items(suite, task)
    key = {
        "items": [it.id for it in items],
        "vector": vec.meta.content_hash,
        "methods": list(METHODS),
        "generation": task in suite.generation_tasks,
        "generation_limit": suite.generation_limit,
    }
    path = score_cache_dir(model, suite) / f"{task}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return dict(cached["scores"])
    scores = evaluate_task(dec, vec, suite, task, METHODS, items)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "scores": scores}))
    tmp.replace(path)
    return scores


def run_suite(model: str, model_dir: Path, suite: Suite) -> dict[str, Any]:
    t0 = time.time()
    adir, ws = ensure_adapter(model_dir, model, suite)
    dec = ReferenceDecoder(model_dir, adir, device=PLACEMENT["device"], dtype=PLACEMENT["dtype"])
    vec, vreport, _ = ensure_vector(dec, model, suite)
    tasks: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for t in suite.test_tasks:
        scores = score_task(dec, vec, model, suite, t)
        tasks[t] = task_summary(scores) | {"seconds": scores["peft"]["_seconds"][0]}
        raw[t] = {
            m: {k: v for k, v in s.items() if not k.startswith("_")} for m, s in scores.items()
        }
        print(
            f"[study] {suite.adapter} {t}: "
            + ", ".join(
                f"{m}={100 * tasks[t][m][primary_metric(t)]['score']:.1f}"
                for m in tasks[t]
                if m != "seconds"
            ),
            flush=True,
        )
    # Average gain over tasks (commonsense: acc; TruthfulQA: mc1 and mc2), CI resampling items.
    average: dict[str, Any] = {}
    metrics = ["mc1", "mc2"] if suite.test_tasks == ("truthfulqa",) else ["acc"]
    for method in STEERED:
        if method not in raw[suite.test_tasks[0]]:
            continue
        average[method] = {}
        for metric in metrics:
            per_task = {
                t: (np.array(raw[t][method][metric]), np.array(raw[t]["peft"][metric]))
                for t in suite.test_tasks
                if metric in raw[t]["peft"]
            }
            average[method][metric] = average_gain_ci(per_task)
    # The warm start's own gain over the base model, the same way.
    warm_start_gain = {
        metric: average_gain_ci(
            {
                t: (np.array(raw[t]["peft"][metric]), np.array(raw[t]["base"][metric]))
                for t in suite.test_tasks
                if metric in raw[t]["base"]
            }
        )
        for metric in metrics
    }
    m = vec.meta
    return {
        "title": suite.title,
        "adapter": suite.adapter,
        "warmstart": ws["result"]
        | {
            "lr": ws["config"]["lr"],
            "epochs": ws["config"]["epochs"],
            "method": ws["config"]["method"],
        },
        "sizes": {
            "calib_items": m.calibration.items,
            "calib_tokens": m.calibration.tokens,
            "test": {t: tasks[t]["peft"][primary_metric(t)]["n"] for t in suite.test_tasks},
        },
        "vector": {
            "mu_bar": m.mu_bar,
            "mu_bar_exact": m.mu_bar_exact,
            "alpha": m.alpha,
            "shift_weighting": m.shift_weighting,
            "estimator": m.estimator,
            "logit_bias_beta": m.calibration.estimators.get("logit_bias_beta"),
            "calibration": vreport,
        },
        "tasks": tasks,
        "average_gain_vs_peft": average,
        "warm_start_gain_vs_base": warm_start_gain,
        "seconds": time.time() - t0,
    }


def primary_metric(task: str) -> str:
    return "mc1" if task == "truthfulqa" else "acc"


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Accuracy study: {report['model']}",
        "",
        f"Generated by `benchmarks/accuracy.py{' --quick' if report['quick'] else ''}` on "
        f"{report['created']} ({report['machine']}), {report['seconds'] / 60:.1f} min of compute.",
        "Scores in %. Commonsense: accuracy of the option with the highest token-normalised "
        "log-likelihood; TruthfulQA: MC1 / MC2. Multiple-choice scoring uses soft steering "
        "(`log_softmax(z + mu*I*dz)`). Δ = paired difference to the PEFT (warm-started) model "
        "with a 95% bootstrap CI over items.",
        "",
    ]
    for s in report["suites"]:
        v = s["vector"]
        lines += [
            f"## {s['title']}",
            "",
            f"Warm start: {s['warmstart']['method']} lr {s['warmstart']['lr']}, "
            f"{s['warmstart']['examples']} examples, {s['warmstart']['seconds'] / 60:.1f} min. "
            f"Calibration: {s['sizes']['calib_items']} items / {s['sizes']['calib_tokens']} tokens. "
            f"mu_bar (precomputed, {v['shift_weighting']} shift, {v['estimator']}) = "
            f"{v['mu_bar']:+.3f}; mu_bar_exact = {v['mu_bar_exact']:+.3f}; logit-bias beta = "
            f"{v['logit_bias_beta']:+.3f}; alpha = {v['alpha']}.",
            "",
        ]
        if "warm_start_gain_vs_base" in s:  # studies from before it was recorded lack it
            gains = ", ".join(
                f"{metric} {format_ci(d)}" for metric, d in s["warm_start_gain_vs_base"].items()
            )
            lines[-1:-1] = [
                f"The warm start's own gain over the base model (average over "
                f"tasks, PEFT - base): {gains}."
            ]
        lines += [
            "| task | metric | n | base | PEFT | +SVD exact | +SVD precomputed | +logit-bias | "
            "Δ exact | Δ precomputed | Δ logit-bias |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t, res in s["tasks"].items():
            for metric in [k for k in res["peft"]]:
                row = [t, metric, str(res["peft"][metric]["n"])]
                row += [pct(res[m][metric]["score"]) if m in res else "—" for m in METHODS]
                row += [
                    format_ci(res[m][metric].get("vs_peft")) if m in res else "—" for m in STEERED
                ]
                lines.append("| " + " | ".join(row) + " |")
        for method, metrics in s["average_gain_vs_peft"].items():
            for metric, d in metrics.items():
                if d["tasks"] == 1:  # the task's own row already has it
                    continue
                lines.append(
                    f"| **average ({d['tasks']} tasks)** | {metric} | {d['n']} | | | | | | "
                    + " | ".join(format_ci(d) if m == method else "" for m in STEERED)
                    + " |"
                )
        lines.append("")
    lines += ["## Not run", ""] + [f"- {x}" for x in report["not_run"]] + [""]
    return "\n".join(lines)


def plot_suite(ax: Any, s: dict[str, Any]) -> None:
    """One suite's likelihood gains over PEFT: a bar (with its 95% CI) per steered method, for
    each task and metric and for the average over tasks."""
    colors = {
        "peft+svd-exact": "#1f77b4",
        "peft+svd-precomputed": "#ff7f0e",
        "peft+logit-bias": "#7f7f7f",
    }
    labels, groups = [], []
    for t, res in s["tasks"].items():
        for metric in res["peft"]:
            if metric in ("acc_sum", "gen"):
                continue
            labels.append(f"{t}\n{metric}")
            groups.append({m: res[m][metric].get("vs_peft") for m in STEERED if m in res})
    averages = next(iter(s["average_gain_vs_peft"].values()), {}) if len(s["tasks"]) > 1 else {}
    for metric_avg in averages:  # one task: its bars are the average
        labels.append(f"AVERAGE\n{metric_avg}")
        groups.append(
            {m: s["average_gain_vs_peft"][m][metric_avg] for m in s["average_gain_vs_peft"]}
        )
    x = np.arange(len(labels))
    width = 0.27
    for k, m in enumerate(STEERED):
        vals = [100 * g[m]["diff"] if g.get(m) else 0 for g in groups]
        err = np.array(
            [
                [100 * (g[m]["diff"] - g[m]["lo"]), 100 * (g[m]["hi"] - g[m]["diff"])]
                if g.get(m)
                else [0, 0]
                for g in groups
            ]
        ).T
        ax.bar(
            x + (k - 1) * width,
            vals,
            width,
            yerr=err,
            capsize=2,
            color=colors[m],
            label=m.replace("peft+", "+"),
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_xlim(-0.75, max(len(labels), 2) - 0.25)  # a lone group keeps the bars' width
    ax.set_ylabel("Δ vs PEFT (points)")
    ax.set_title(s["title"], fontsize=9)
    ax.legend(fontsize=7, ncol=3)


def save_panels(report: dict[str, Any], path: Path, panels: list[Callable[[Any], None]]) -> None:
    """The frame every accuracy figure shares: one full-width panel per callable, stacked, under
    the model's title, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, draw in zip(axes[:, 0], panels, strict=True):
        draw(ax)
    fig.suptitle(
        f"SVD gains over the warm-started model, {report['model']} (95% bootstrap CIs)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(report: dict[str, Any], path: Path) -> None:
    save_panels(report, path, [partial(plot_suite, s=s) for s in report["suites"]])


def not_run(model: str) -> list[str]:
    """What the study did not measure, stated next to what it did."""
    out = [
        "Qwen2.5-Coder-0.5B (two models were studied: SmolLM2-135M-Instruct and Gemma-3-270M base)",
        "Prompt Tuning / P-Tuning v2 warm starts (reference decoder supports them; not in this study)",
        "TruthfulQA open-ended (LLM-judged) generation: no judge model is available offline",
    ]
    if model.startswith("gemma"):
        out += [
            "Gemma-3-270M: TruthfulQA, the paper's lr 5e-5 warm starts, PIQA-IA3 and greedy-generation "
            "accuracy (every step costs ~2.5x SmolLM2's here: vocab 262144); 40 test items per "
            "commonsense set instead of 100-150",
        ]
    else:
        out.append(
            "Greedy-generation accuracy beyond ARC-Easy/ARC-Challenge (first 100 test items)"
        )
    return out


def merge(paths: list[Path], base: Path) -> int:
    """One report from several partial runs (suites run in parallel processes)."""
    reports = [json.loads(p.read_text()) for p in paths]
    order = [s.adapter for s in suites_for(reports[0]["model"], bool(reports[0].get("quick")))]
    merged = reports[0] | {"suites": [], "seconds": sum(r.get("seconds", 0) for r in reports)}
    seen: dict[str, Any] = {}
    for r in reports:
        for s in r["suites"]:
            seen[s["adapter"]] = s
    merged["suites"] = sorted(
        seen.values(), key=lambda s: order.index(s["adapter"]) if s["adapter"] in order else 99
    )
    merged["not_run"] = not_run(merged["model"])
    merged["note"] = "merged from parallel partial runs: " + ", ".join(p.name for p in paths)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(merged, indent=2))
    base.with_suffix(".md").write_text(markdown(merged))
    plot(merged, base.with_suffix(".png"))
    print(base.with_suffix(".md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="smoke-sized study, <= 10 minutes")
    ap.add_argument("--only", action="append", help="run only these adapters (suite names)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--merge", nargs="+", type=Path, help="combine the suites of these reports and exit"
    )
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    PLACEMENT.update(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    place = resolve(args.device, args.dtype)
    if args.merge:
        return merge(args.merge, args.out / f"accuracy-{args.model}")
    t0 = time.time()
    model_dir = ensure_model(args.model)
    build_tasks()
    suites = suites_for(args.model, args.quick)
    if args.only:
        suites = [s for s in suites if s.adapter in args.only]
    report: dict[str, Any] = {
        "model": args.model,
        "quick": args.quick,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; models on {place.describe()}",
        "splits": json.loads((tasks_dir() / "manifest.json").read_text())["tasks"],
        "suites": [],
        "not_run": not_run(args.model),
    }
    suffix = "-quick" if args.quick else ""
    base = args.out / f"accuracy-{args.model}{suffix}"
    order = [s.adapter for s in suites_for(args.model, args.quick)]
    if args.only and base.with_suffix(".json").exists():
        # Partial run: keep the other suites' results from the last report.
        previous = json.loads(base.with_suffix(".json").read_text())
        report["suites"] = [s for s in previous["suites"] if s["adapter"] not in args.only]
    for suite in suites:
        report["suites"].append(run_suite(args.model, model_dir, suite))
        report["suites"].sort(
            key=lambda s: order.index(s["adapter"]) if s["adapter"] in order else 99
        )
        report["seconds"] = time.time() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(report, indent=2))
        base.with_suffix(".md").write_text(markdown(report))
    plot(report, base.with_suffix(".png"))
    print(base.with_suffix(".md").read_text())
    print(f"[study] done in {(time.time() - t0) / 60:.1f} min -> {base}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
