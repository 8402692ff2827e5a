"""Which dtype the offline tools should pick on this CPU: bf16 against float32, measured.

``--dtype auto`` on CPU follows ``precision.cpu_bf16_is_fast``. This script measures what that
rule rests on, on the machine it runs on, and names the CPU kind in the file it writes:

* a matmul of the shape that first showed the gap (1024x576 @ 576x1536), GFLOPS per dtype;
* a forward pass of 8 x 128 tokens through a SmolLM2-135M-shaped Llama (random weights: the
  compute is the shape's, no download needed), seconds per dtype.

Each figure is the median of ``--repeats`` timed runs after a warm-up. Other jobs on the cores
distort it: stop them first (the numbers say how many threads torch used).

    python -m benchmarks.cpu_dtype [--repeats 5]

Writes ``benchmarks/results/cpu-dtype-<kind>.{json,md}``, kind = ``amx``, ``avx512-bf16`` or
``avx2`` (the CPU's best bf16 path).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from svd_vllm.offline.precision import cpu_bf16_is_fast, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
#: SmolLM2-135M's architecture (its config.json), the model the first measurement used.
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def cpu_kind() -> str:
    """The CPU's best bf16 path: ``amx``, ``avx512-bf16`` or ``avx2``."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512-bf16"
    return "avx2"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (oneDNN picks and caches its kernels here)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 576, generator=g).to(dtype)
    b = torch.randn(576, 1536, generator=g).to(dtype)
    inner = 20
    sec = median_seconds(lambda: [a @ b for _ in range(inner)], repeats) / inner
    return 2 * 1024 * 576 * 1536 / sec / 1e9


def forward_seconds(dtype: torch.dtype, repeats: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype).eval()
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (8, 128))
    with torch.inference_mode():
        return median_seconds(lambda: model(input_ids=ids).logits, repeats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    kind = cpu_kind()
    res: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "kind": kind,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "auto_dtype": str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch."),
        "bf16_is_fast": cpu_bf16_is_fast(),
    }
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        res[f"matmul_gflops_{name}"] = matmul_gflops(dtype, args.repeats)
        res[f"forward_seconds_{name}"] = forward_seconds(dtype, args.repeats)
    res["forward_bf16_speedup"] = res["forward_seconds_float32"] / res["forward_seconds_bfloat16"]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cpu-dtype-{kind}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = [
        f"# bf16 vs float32 on this CPU ({kind})",
        "",
        f"{res['created']}; {res['cpu']} (torch capability {res['torch_capability']}, "
        f"{res['threads']} threads, torch {res['torch']}); median of {args.repeats} runs.",
        "",
        "| | float32 | bfloat16 | bf16 / fp32 |",
        "|---|---|---|---|",
        f"| matmul 1024x576 @ 576x1536, GFLOPS | {res['matmul_gflops_float32']:.0f} | "
        f"{res['matmul_gflops_bfloat16']:.0f} | "
        f"{res['matmul_gflops_bfloat16'] / res['matmul_gflops_float32']:.2f}x |",
        f"| SmolLM2-135M shape, forward 8 x 128 tokens, s | {res['forward_seconds_float32']:.2f} "
        f"| {res['forward_seconds_bfloat16']:.2f} | {res['forward_bf16_speedup']:.2f}x faster |",
        "",
        f"`--dtype auto` picks **{res['auto_dtype']}** here (bf16 only on AMX CPUs: "
        "`precision.cpu_bf16_is_fast`).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
