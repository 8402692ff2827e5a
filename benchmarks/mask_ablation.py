"""What SVD's gain is made of: the shift, or the confidence mask alone?

SVD both shifts the adapter's logits along the vector and confines the shift (and, when decoding,
the choice) to the confidence mask ``p >= alpha * max p``, which at alpha = 0.1 is a min-p filter.
This study scores, on the accuracy study's own suites, items and cached adapters and vectors:

* ``peft`` and ``peft+svd-precomputed`` (what vLLM serves), as in ``benchmarks/accuracy.py``;
* ``peft+svd-mask``: the same mask and alpha, the vector zeroed;
* ``peft+min-p``: ``min_p = alpha``, vLLM's own filter, applied to the adapter's distribution
  (multiple choice: log-likelihoods under the filtered, renormalised distribution, so an option
  with a token outside the kept set has probability 0).

Every difference is paired over the same items with a 95% bootstrap CI, to PEFT and between SVD and
the mask alone. Greedy generation (``gen``) keeps the argmax under both mask methods, so theirs
equals PEFT's by construction; vLLM itself never applies ``min_p`` to a greedy request (its
``MinPLogitsProcessor`` is argmax-invariant), so a ``min_p`` row through vLLM generation would be
PEFT's row exactly.

    python -m benchmarks.mask_ablation --model smollm2-135m --only cs-lora-strong --only cs-lora-paper

Writes ``benchmarks/results/mask-ablation-<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import accuracy
from benchmarks.cpu_dtype import cpu_kind, cpu_model
from svd_vllm.offline.assets import ensure_model
from svd_vllm.offline.evaluation import (
    ABLATION_METHODS,
    average_gain_ci,
    evaluate_items,
    format_ci,
    method_specs,
    paired_bootstrap,
    task_summary,
)
from svd_vllm.offline.precision import DEVICES, DTYPES, resolve
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.tasks import build_tasks, load_items, tasks_dir

METHODS = ("peft", "peft+svd-precomputed", *ABLATION_METHODS)
#: The paired comparisons reported: (method, against).
PAIRS = (
    ("peft+svd-precomputed", "peft"),
    ("peft+svd-mask", "peft"),
    ("peft+min-p", "peft"),
    ("peft+svd-precomputed", "peft+svd-mask"),
)
LABELS = {"peft": "PEFT", "peft+svd-precomputed": "+SVD", "peft+svd-mask": "+mask only"}
LABELS["peft+min-p"] = "+min_p"


def _pair_label(a: str, b: str) -> str:
    return f"{LABELS[a]} - {LABELS[b]}"


def run_suite(model: str, model_dir: Path, suite: accuracy.Suite) -> dict[str, Any]:
    """One suite: its cached (or re-made) adapter and vector, every method on its test items."""
    t0 = time.time()
    adir, _ = accuracy.ensure_adapter(model_dir, model, suite)
    place = accuracy.PLACEMENT
    dec = ReferenceDecoder(model_dir, adir, device=place["device"], dtype=place["dtype"])
    vec, _, _ = accuracy.ensure_vector(dec, model, suite)
    tasks: dict[str, Any] = {}
    raw: dict[str, dict[str, dict[str, list[float]]]] = {}
    for t in suite.test_tasks:
        items = load_items(tasks_dir() / t / "test.jsonl", limit=suite.test_per_task)
        scores = evaluate_items(
            dec,
            items,
            method_specs(vec, include=METHODS),
            generation=t in suite.generation_tasks,
            gen_limit=suite.generation_limit or None,
            desc=t,
            batch_size=place["batch_size"],
        )
        raw[t] = {
            m: {k: v for k, v in s.items() if not k.startswith("_")} for m, s in scores.items()
        }
        tasks[t] = {"scores": task_summary(raw[t]), "pairs": _pairs(raw[t])}
        print(f"[ablation] {suite.adapter} {t}: " + _line(tasks[t]), flush=True)
    metrics = ["mc1", "mc2"] if suite.test_tasks == ("truthfulqa",) else ["acc"]
    average = {
        _pair_label(a, b): {
            metric: average_gain_ci(
                {t: (np.array(raw[t][a][metric]), np.array(raw[t][b][metric])) for t in raw}
            )
            for metric in metrics
        }
        for a, b in PAIRS
    }
    return {
        "title": suite.title,
        "adapter": suite.adapter,
        "vector": {"mu_bar": vec.meta.mu_bar, "alpha": vec.meta.alpha},
        "tasks": tasks,
        "average": average,
        "seconds": time.time() - t0,
    }


def _pairs(raw: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    return {
        _pair_label(a, b): {
            metric: paired_bootstrap(raw[a][metric], raw[b][metric]) for metric in raw[b]
        }
        for a, b in PAIRS
    }


def _line(task: dict[str, Any]) -> str:
    metric = next(iter(task["scores"]["peft"]))
    return ", ".join(f"{LABELS[m]}={100 * task['scores'][m][metric]['score']:.1f}" for m in METHODS)


def markdown(report: dict[str, Any]) -> str:
    """The report: per suite, each task's scores and paired differences, then the averages."""
    pair_names = [_pair_label(a, b) for a, b in PAIRS]
    lines = [
        f"# What the gain is made of: {report['model']}",
        "",
        f"Generated by `benchmarks/mask_ablation.py` on {report['created']} ({report['machine']}), "
        f"{report['seconds'] / 60:.1f} min of compute. Scores in %; every Δ is paired over the "
        "same items with a 95% bootstrap CI. Multiple choice scores the options' token-normalised "
        "log-likelihood (TruthfulQA: MC1 / MC2); `gen` is greedy generation. See the module's "
        "docstring for the methods.",
        "",
    ]
    for s in report["suites"]:
        v = s["vector"]
        lines += [
            f"## {s['title']}",
            "",
            f"Vector: mu_bar = {v['mu_bar']:+.3f}, alpha = {v['alpha']} (min_p = alpha).",
            "",
            "| task | metric | n | "
            + " | ".join(LABELS[m] for m in METHODS)
            + " | "
            + " | ".join(f"Δ {p}" for p in pair_names)
            + " |",
            "|---" * (3 + len(METHODS) + len(pair_names)) + "|",
        ]
        for t, res in s["tasks"].items():
            for metric, peft in res["scores"]["peft"].items():
                row = [t, metric, str(peft["n"])]
                row += [f"{100 * res['scores'][m][metric]['score']:.1f}" for m in METHODS]
                row += [format_ci(res["pairs"][p].get(metric)) for p in pair_names]
                lines.append("| " + " | ".join(row) + " |")
        for metric in next(iter(s["average"].values())):
            d0 = s["average"][pair_names[0]][metric]
            if d0["tasks"] == 1:
                continue
            row = [f"**average ({d0['tasks']} tasks)**", metric, str(d0["n"])]
            row += [""] * len(METHODS) + [format_ci(s["average"][p][metric]) for p in pair_names]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", action="append", help="only these suites (adapter names)")
    ap.add_argument("--out", type=Path, default=accuracy.RESULTS)
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    accuracy.PLACEMENT.update(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    place = resolve(args.device, args.dtype)
    suites = accuracy.suites_for(args.model, quick=False)
    if args.only:
        unknown = sorted(set(args.only) - {s.adapter for s in suites})
        if unknown:
            ap.error(f"no suite {unknown} for {args.model}: {[s.adapter for s in suites]}")
        suites = [s for s in suites if s.adapter in args.only]
    t0 = time.time()
    model_dir = ensure_model(args.model)
    needed = (t for s in suites for t in s.train_tasks + s.calib_tasks + s.test_tasks)
    build_tasks(tuple(dict.fromkeys(needed)))
    report: dict[str, Any] = {
        "model": args.model,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu_model()} ({cpu_kind()}), {os.cpu_count()} cores, "
        f"{platform.machine()}; models on {place.describe()}",
        "suites": [],
    }
    base = args.out / f"mask-ablation-{args.model}"
    for suite in suites:
        report["suites"].append(run_suite(args.model, model_dir, suite))
        report["seconds"] = time.time() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(report, indent=2))
        base.with_suffix(".md").write_text(markdown(report))
    print(base.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
