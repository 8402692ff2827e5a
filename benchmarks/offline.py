"""The offline tools at the scale users serve: extraction and warm start on an 8B-class shape.

The GPU machines cannot fetch real weights, so the model is a Llama built from a config on the
device, randomly initialised (Llama-3.1-8B's shape: hidden 4096, 32 layers, 32 heads with 8 KV
heads, intermediate 14336, vocab 128256), with a LoRA r=8 on q,k,v,o. Random weights give nearly
flat next-token distributions, which would put most of the vocabulary inside the confidence mask;
the output head is therefore scaled so the logits spread like a trained model's (std ~3), and the
LoRA's B matrices get small random values so the adapter differs from the base. The timings do
not depend on the values; the mask size does, and it is reported.

Measured, in this order (each result is written as soon as it exists):
1. extraction (``extract_vector``, both passes and the full calibration) on a 320-item calibration
   set: about 3,000 completion tokens behind prompts of 60-140 tokens; calibration tokens/s,
   all tokens/s, wall time and peak GPU memory against the bf16 weights;
2. warm start (``train_encoded``): 1 epoch of 2,000 examples of ~128 tokens at batch 16, and a
   short run at the paper's batch size 1 to project the paper's setting.

    python -m benchmarks.offline                          # GPU: the 8B shape
    python -m benchmarks.offline --shape tiny --quick     # CPU dry run (seconds)

Writes ``benchmarks/results/offline-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from svd_vllm.offline.extraction import EncodedItem, extract_vector, length_batches
from svd_vllm.offline.precision import resolve
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.warmstart import WarmStartConfig, train_encoded

ROOT = Path(__file__).resolve().parents[1]

#: The Llama shapes the benchmark builds: Llama-3-8B's, and a tiny one for tests.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
SHAPES: dict[str, dict[str, int]] = {
    "8b": dict(zip(SHAPE_FIELDS, (4096, 32, 32, 8, 14336, 128256), strict=True)),
    "tiny": dict(zip(SHAPE_FIELDS, (64, 2, 4, 2, 128, 4096), strict=True)),
}
LOGIT_STD = 3.0


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A randomly initialised Llama of ``shape`` built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.normal_(0.0, LOGIT_STD / math.sqrt(cfg.hidden_size))
    return model.eval()


def add_lora(model: Any, seed: int = 1) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return peft_model.eval()


def calibration_set(n_items: int, vocab: int, seed: int = 2) -> list[EncodedItem]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_items):
        n_ctx = int(torch.randint(60, 141, (1,), generator=g))
        n_ans = int(torch.randint(4, 16, (1,), generator=g))
        ids = torch.randint(10, vocab, (n_ctx + n_ans,), generator=g).tolist()
        out.append(EncodedItem(ids, n_ctx))
    return out


def training_set(n: int, vocab: int, seed: int = 3) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(112, 145, (1,), generator=g))
        ids = torch.randint(10, vocab, (length,), generator=g).tolist()
        out.append((ids, length - 16))
    return out


def _tokenizer(tmp: Path) -> Any:
    from svd_vllm.tools.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp / "tok")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_extraction(args: argparse.Namespace, report: dict[str, Any], tmp: Path) -> Any:
    place = resolve(args.device, args.dtype)
    t0 = time.perf_counter()
    model = add_lora(build_model(args.shape, place.device, place.dtype))
    _sync(place.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report["model"] = {
        "shape": args.shape,
        **SHAPES[args.shape],
        "build_seconds": time.perf_counter() - t0,
        "weight_bytes": weights,
    }
    dec = ReferenceDecoder.from_model(model, _tokenizer(tmp), adapter_dir="bench-lora")
    items = calibration_set(args.items, SHAPES[args.shape]["vocab_size"])
    answer = sum(it.n_labels for it in items)
    prompt = sum(it.n_ctx for it in items)

    def extract(subset: list[EncodedItem], batch_size: int, reps: int) -> Any:
        return extract_vector(
            dec,
            [],
            name="bench",
            encoded=subset,
            batch_size=batch_size,
            bootstrap_reps=reps,
            progress=False,
            base_model="random-8b",
            adapter="random-lora",
        )

    extract(items[:16], args.batch_size[0], 2)  # warm-up: kernels, cuBLAS handles, allocator
    report["extraction"] = {
        "placement": place.describe(),
        "items": len(items),
        "answer_tokens": answer,
        "prompt_tokens": prompt,
        "runs": [],
    }
    for bs in args.batch_size:
        _reset_peak(place.device)
        _sync(place.device)
        t0 = time.perf_counter()
        art, rep = extract(items, bs, args.bootstrap)
        _sync(place.device)
        seconds = time.perf_counter() - t0
        peak = _peak(place.device)
        summary = rep.summary()
        report["extraction"]["runs"].append(
            {
                "batch_size": bs,
                "seconds": seconds,
                "seconds_passes": summary["seconds_passes"],
                "seconds_calibration": seconds - summary["seconds_passes"],
                "calibration_tokens_per_s": (answer + prompt) / seconds,
                "completion_tokens_per_s": answer / seconds,
                "forward_tokens_per_s": 3 * (answer + prompt) / seconds,
                "peak_bytes": peak,
                "peak_over_weights_bytes": None if peak is None else peak - weights,
                "mask_positions": art.meta.calibration.positions,
                "mu_bar": art.meta.mu_bar,
                "estimator": art.meta.estimator,
                "shift_finite": bool(torch.isfinite(art.shift).all()),
                "bootstrap_reps": args.bootstrap,
            }
        )
        write(report, args.out)
    # The floor: the same three passes with nothing after the logits.
    batches = length_batches(items, args.batch_size[-1])
    _sync(place.device)
    t0 = time.perf_counter()
    for adapter in (True, False, True):
        for b in batches:
            dec.teacher_forced(
                [items[i].ids for i in b], [items[i].n_ctx for i in b], adapter=adapter
            )
    _sync(place.device)
    report["extraction"]["forward_only_seconds"] = time.perf_counter() - t0
    write(report, args.out)
    return model


def bench_warmstart(
    args: argparse.Namespace, report: dict[str, Any], model: Any, tmp: Path
) -> None:
    place = resolve(args.device, args.dtype)
    base = model.unload()  # the bare base model: LoRA layers removed, weights untouched
    del model
    vocab = SHAPES[args.shape]["vocab_size"]
    runs = {"batch": (args.train_examples, args.train_batch), "paper": (args.paper_examples, 1)}
    report["warmstart"] = {"placement": place.describe()}
    for label, (n, bs) in runs.items():
        data = training_set(n, vocab)
        cfg = WarmStartConfig(
            lr=5e-5,
            batch_size=bs,
            max_length=512,
            checkpoint_every=0,
            device=str(place.device),
            dtype=args.dtype,
            gradient_checkpointing=args.checkpointing,
        )
        _reset_peak(place.device)
        _sync(place.device)
        t0 = time.perf_counter()
        res = train_encoded(base, data, tmp / f"ws-{label}", cfg, progress=False)
        _sync(place.device)
        seconds = time.perf_counter() - t0
        report["warmstart"][label] = {
            "examples": n,
            "batch_size": bs,
            "tokens": sum(len(i) for i, _ in data),
            "seconds": seconds,
            "examples_per_s": n / seconds,
            "peak_bytes": _peak(place.device),
            "first_loss": res.first_loss,
            "last_loss": res.last_loss,
            "gradient_checkpointing": args.checkpointing,
        }
        write(report, args.out)
    paper = report["warmstart"]["paper"]
    report["warmstart"]["paper_projection"] = {
        "setting": "lr 5e-5, 1 epoch, batch 1, max length 512 (paper Table 7)",
        "seconds_per_10k_examples": 10_000 / paper["examples_per_s"],
    }
    write(report, args.out)


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Offline tools: {report['device']}",
        "",
        f"Generated by `benchmarks/offline.py` on {report['created']} ({report['host']}; "
        f"torch {report['torch']}). Model: a randomly initialised Llama of the `{report['args']['shape']}` "
        "shape built on the device (see the script's docstring), LoRA r=8 on q,k,v,o.",
        "",
    ]
    ex = report.get("extraction")
    if ex:
        m = report["model"]
        lines += [
            "## Extraction (`extract_vector`: both passes and the whole calibration)",
            "",
            f"{ex['placement']}; {ex['items']} items, {ex['answer_tokens']} completion tokens "
            f"behind {ex['prompt_tokens']} prompt tokens; weights {_gib(m['weight_bytes'])}. "
            "Calibration tokens = prompt + completion tokens of the set (each runs through 3 "
            'forward passes: adapter and base, then adapter again). "calibration" is the '
            "estimators and their 200-resample bootstrap, on the same device. After one untimed "
            "warm-up.",
            "",
            "| batch | wall | passes | calibration | calibration tok/s | completion tok/s | "
            "forward tok/s | peak GPU memory | peak over weights |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ex["runs"]:
            lines.append(
                f"| {r['batch_size']} | {r['seconds']:.1f} s | {r['seconds_passes']:.1f} s | "
                f"{r['seconds_calibration']:.1f} s | {r['calibration_tokens_per_s']:,.0f} | "
                f"{r['completion_tokens_per_s']:,.0f} | {r['forward_tokens_per_s']:,.0f} | "
                f"{_gib(r['peak_bytes'])} | {_gib(r['peak_over_weights_bytes'])} |"
            )
        r = ex["runs"][-1]
        lines += [
            "",
            f"Masked-in positions: {r['mask_positions']}; mu_bar {r['mu_bar']:+.4g} "
            f"({r['estimator']}); shift finite: {r['shift_finite']}; bootstrap reps "
            f"{r['bootstrap_reps']}.",
        ]
        if "forward_only_seconds" in ex:
            lines += [
                "",
                f"The same three passes with nothing after the logits (batch "
                f"{ex['runs'][-1]['batch_size']}): {ex['forward_only_seconds']:.1f} s.",
            ]
        lines.append("")
    ws = report.get("warmstart")
    if ws:
        lines += [
            "## Warm start (`train_encoded`, 1 epoch)",
            "",
            "| run | examples | batch | tokens | wall | examples/s | peak GPU memory | loss first -> last |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in ("batch", "paper"):
            r = ws.get(label)
            if r:
                lines.append(
                    f"| {label} | {r['examples']} | {r['batch_size']} | {r['tokens']} | "
                    f"{r['seconds']:.1f} s | {r['examples_per_s']:.1f} | {_gib(r['peak_bytes'])} | "
                    f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
                )
        proj = ws.get("paper_projection")
        if proj:
            lines += [
                "",
                f"Projection for the paper's setting ({proj['setting']}): "
                f"{proj['seconds_per_10k_examples'] / 60:.1f} min per 10,000 examples.",
            ]
    return "\n".join(lines) + "\n"


def render(path: Path) -> None:
    """Rewrite ``<path>.md`` from a report's JSON (after a change to the table layout)."""
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"offline-{report['device_slug']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=tuple(SHAPES), default="8b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--items", type=int, default=320)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--paper-examples", type=int, default=64)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    ap.add_argument("--skip-warmstart", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.bootstrap, args.train_examples, args.paper_examples = 24, 10, 32, 4
    place = resolve(args.device, args.dtype)
    name = (
        torch.cuda.get_device_name(place.device)
        if place.device.type == "cuda"
        else f"CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    report: dict[str, Any] = {
        "device": name,
        "device_slug": name.lower().replace(" ", "-"),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.machine()}, {platform.python_version()}",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as d:
        model = bench_extraction(args, report, Path(d))
        if not args.skip_warmstart:
            bench_warmstart(args, report, model, Path(d))
    write(report, args.out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
