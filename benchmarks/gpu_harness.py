"""The GPU serving path without vLLM: both processors on CUDA, checked and timed in one run.

The GPU machines have torch and Triton but no vLLM, so this script stubs the vLLM names the
plugin relies on (``compat.REQUIREMENTS``; as vllm-lens's unit tests do) and drives ``SVDLogitsProcessorV1`` and
``SVDLogitsProcessorV2`` directly:

1. correctness: a mixed batch (unsteered rows, 3 vectors, 2 strengths, an all ``-inf`` row,
   ``-inf`` entries, +-1e4 logits, alpha 1, and for V2 a request with several rows, as speculative
   decoding makes them) against the torch reference, row by row;
2. no host sync: ``apply`` under ``torch.cuda.set_sync_debug_mode("error")``;
3. timings: the kernel at B in {1, 256, 512} x V in {152064, 262144} (fp32, CUDA events), the
   share of the copy bandwidth measured in the same run, B = 1 GPU time inside a CUDA graph of
   many calls, the host launch cost of ``apply``, and the torch reference path for comparison.

Results go to ``benchmarks/results/gpu-<device>.{json,md}``. Budget: about 2 minutes on an H100.

    python -m benchmarks.gpu_harness                  # on a GPU machine (Triton + CUDA)
    TRITON_INTERPRET=1 PYTHONPATH=.triton-interp \\
        python -m benchmarks.gpu_harness --device cpu --vocab 4096 --quick   # a dry run on CPU
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
import types
from abc import ABC, ABCMeta, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from svd_vllm.vllm.compat import Requirement

ROOT = Path(__file__).resolve().parents[1]


# -- vLLM stubs, built from compat.REQUIREMENTS (the names the plugin relies on) --------------
def _stub_class(req: Requirement) -> type:
    """A stand-in for one required vLLM class. An interface (``params``) becomes an ABC whose
    abstract methods are ``abstract_within`` (other methods: no-ops); a record (``fields``)
    takes its fields as keyword arguments and names each as a class attribute, so enum members
    (``MoveDirectionality.SWAP``) compare equal to themselves."""
    ns: dict[str, Any] = {name: name for name in req.fields}
    if req.params:
        abstract = req.abstract_within or frozenset()
        for method in {*req.params, *abstract}:
            ns[method] = abstractmethod(_noop) if method in abstract else _noop
        return ABCMeta(req.name, (ABC,), ns)

    def __init__(self: Any, **values: Any) -> None:
        self.__dict__.update(values)

    ns["__init__"] = __init__
    return type(req.name, (), ns)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def install_vllm_stubs() -> None:
    """``sys.modules`` entries for every module of ``compat.REQUIREMENTS`` (and its parents)."""
    from svd_vllm.vllm.compat import REQUIREMENTS

    for req in REQUIREMENTS:
        parts = req.module.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(sys.modules[req.module], req.name, _stub_class(req))


class Params:
    """What the processors read of ``SamplingParams``."""

    def __init__(self, **extra: Any) -> None:
        self.extra_args: dict[str, Any] | None = extra or None


# -- setup --------------------------------------------------------------------------------------
def make_registry(root: Path, vocab: int) -> None:
    from svd_vllm.core.artifact import SteeringArtifact
    from svd_vllm.registry import Registry

    os.environ["SVD_VLLM_REGISTRY"] = str(root)
    reg = Registry(root)
    g = torch.Generator().manual_seed(0)
    for i, (name, mu, alpha) in enumerate([("a", -4.0, 0.1), ("b", -9.0, 0.3), ("c", 2.0, 0.05)]):
        reg.add(
            SteeringArtifact.create(
                torch.randn(vocab, generator=g) * (1 + i),
                name=name,
                base_model="b",
                adapter=name,
                tokenizer_fingerprint="t",
                mu_bar=mu,
                alpha=alpha,
            )
        )


def config(vocab: int, max_seqs: int) -> Any:
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(get_vocab_size=lambda: vocab),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_seqs),
        parallel_config=types.SimpleNamespace(
            rank=0, tensor_parallel_size=1, pipeline_parallel_size=1
        ),
    )


# What each request of the mixed batch asks for; None = unsteered. (vector, scale, alpha)
REQUESTS: list[tuple[str, float | None, float | None] | None] = [
    ("a", None, None),
    None,
    ("b", None, None),
    ("b", 0.5, None),
    ("c", None, None),
    None,
    ("a", 2.0, 1.0),
    ("a", None, None),
    ("c", -1.0, 0.5),
    ("b", None, None),
]


def mixed_logits(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(rows, vocab, generator=g) * 3
    z[2] = -math.inf  # an all -inf row (steered: must stay as it is)
    z[4, :: max(vocab // 50, 1)] = -math.inf  # entries removed by another processor
    z[7] = 1e4  # huge logits with ties at the maximum
    z[7, 3] = -1e4
    z[9] = torch.linspace(-1e4, 1e4, vocab)
    return z.to(device)


def reference_row(z: torch.Tensor, shift: torch.Tensor, mu: float, alpha: float) -> torch.Tensor:
    from svd_vllm.core.steering import confidence_mask, precomputed_delta, steer

    zr = z.detach().cpu().double().unsqueeze(0)
    s = shift.double()
    out = steer(zr, precomputed_delta(zr, s), mu, confidence_mask(zr, alpha))
    return out[0].float()


def expected(z: torch.Tensor, requests: list[Any], vectors: dict[str, Any]) -> torch.Tensor:
    out = z.detach().cpu().clone()
    for r, req in enumerate(requests):
        if req is None:
            continue
        name, scale, alpha = req
        e, shift = vectors[name]
        out[r] = reference_row(z[r], shift, e.strength(scale), e.mask_alpha(alpha))
    return out


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    got = got.detach().cpu()
    same_mask = bool(torch.equal(torch.isneginf(got), torch.isneginf(want)))
    fin = torch.isfinite(want)
    diff = float((got[fin] - want[fin]).abs().max()) if fin.any() else 0.0
    return {"same_mask": same_mask, "max_abs_diff": diff, "nan": bool(torch.isnan(got).any())}


def steering_args(req: Any) -> Params:
    if req is None:
        return Params()
    name, scale, alpha = req
    extra: dict[str, Any] = {"svd": 1, "svd_vector": name}
    if scale is not None:
        extra["svd_scale"] = scale
    if alpha is not None:
        extra["svd_alpha"] = alpha
    return Params(**extra)


# -- correctness ----------------------------------------------------------------------------------
def check(device: torch.device, vocab: int) -> dict[str, Any]:
    import numpy as np
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    from svd_vllm.registry import Registry
    from svd_vllm.vllm.processor import SVDLogitsProcessor

    reg = Registry()
    vectors = {e.name: (e, reg.load(e).shift) for e in reg.list()}
    n = len(REQUESTS)
    z = mixed_logits(n, vocab, device)
    sync_mode = device.type == "cuda"
    out: dict[str, Any] = {}

    # V1: rows are batch positions.
    v1 = SVDLogitsProcessor(config(vocab, 16), device, device.type == "cuda")
    added = [(i, steering_args(r), None, []) for i, r in enumerate(REQUESTS)]
    v1.update_state(BatchUpdate(batch_size=n, removed=[], added=added, moved=[]))
    v1.apply(z.clone())  # first call flushes the state
    zz = z.clone()
    if sync_mode:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = v1.apply(zz)
    finally:
        if sync_mode:
            torch.cuda.set_sync_debug_mode("default")
    out["v1"] = compare(got, expected(z, REQUESTS, vectors))
    out["v1"]["no_host_sync"] = sync_mode

    # V2: slots are scattered, rows reordered, and slot 11 owns three rows (speculative decoding).
    req_states = types.SimpleNamespace(device=device, max_num_reqs=32)
    v2 = SVDLogitsProcessor(config(vocab, 32), req_states)
    slot_of = [11, 3, 29, 0, 17, 5, 8, 21, 2, 30]
    for slot, r in zip(slot_of, REQUESTS, strict=True):
        v2.add_request(slot, steering_args(r))
    v2.apply_staged_writes()
    rows = [11, 11, 11, 3, 29, 0, 17, 5, 8, 21, 2, 30]
    by_slot = dict(zip(slot_of, REQUESTS, strict=True))
    row_requests = [by_slot[s] for s in rows]
    z2 = mixed_logits(len(rows), vocab, device)
    m = torch.tensor(rows, dtype=torch.int32, device=device)
    ctx = LogitsContext(
        expanded_idx_mapping=m,
        idx_mapping=m,
        idx_mapping_np=np.array(slot_of, dtype=np.int32),
        expanded_local_pos=torch.zeros_like(m),
        input_ids=torch.zeros_like(m),
        pos=torch.zeros_like(m),
        seq_lens_upper_bound_np=np.ones(len(slot_of), dtype=np.int32),
    )
    v2.apply(z2.clone(), ctx)  # compiles the row -> slot variant of the kernel
    zz = z2.clone()
    if sync_mode:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = v2.apply(zz, ctx)
    finally:
        if sync_mode:
            torch.cuda.set_sync_debug_mode("default")
    out["v2"] = compare(got, expected(z2, row_requests, vectors))
    out["v2"]["no_host_sync"] = sync_mode
    out["ok"] = all(
        r["same_mask"] and not r["nan"] and r["max_abs_diff"] < 1e-3 for r in (out["v1"], out["v2"])
    )
    return out


# -- timings --------------------------------------------------------------------------------------
def cuda_time_us(fn: Any, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def copy_bandwidth_gbs(device: torch.device) -> float:
    src = torch.empty(512 * 262144, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), 50)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def timings(device: torch.device, quick: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"copy_gbs": copy_bandwidth_gbs(device), "shapes": []}
    shapes = [(1, 152064), (256, 152064), (512, 152064), (256, 262144), (512, 262144)]
    for rows, vocab in shapes[:2] if quick else shapes:
        entry = time_shape(device, rows, vocab)
        entry["share_of_copy"] = entry["effective_gbs"] / res["copy_gbs"]
        res["shapes"].append(entry)
    return res


def time_shape(device: torch.device, rows: int, vocab: int) -> dict[str, Any]:
    """Kernel and torch-reference time for one shape, all rows steered by one vector."""
    from svd_vllm.core.steering import steer_table_rows_
    from svd_vllm.vllm.kernel import SteeringKernel
    from svd_vllm.vllm.request_slots import SlotTensors

    g = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(rows, vocab, device=device, generator=g) * 3
    table = torch.randn(4, vocab, device=device, generator=g)
    tidx = torch.zeros(rows, dtype=torch.int32, device=device)
    mu = torch.full((rows,), -3.0, device=device)
    la = torch.full((rows,), math.log(0.1), device=device)
    kern = SteeringKernel(device, vocab, rows)
    state = SlotTensors(tidx, mu, la)
    z = z0.clone()
    used = torch.zeros(1, dtype=torch.long, device=device)
    row_vec = torch.zeros(rows, dtype=torch.long, device=device)

    def run_copy() -> None:
        z.copy_(z0)  # every timed call starts from fresh logits: steering -infs most of a row

    def run_kernel() -> None:
        z.copy_(z0)
        kern(z, table, state)

    def run_torch() -> None:
        z.copy_(z0)
        steer_table_rows_(z, table, used, row_vec, mu, la)

    iters = 200 if rows == 1 else 50
    copy_us = cuda_time_us(run_copy, iters)
    kernel_us = cuda_time_us(run_kernel, iters) - copy_us
    entry: dict[str, Any] = {
        "rows": rows,
        "vocab": vocab,
        "kernel_us": kernel_us,
        "torch_reference_us": cuda_time_us(run_torch, max(iters // 5, 5)) - copy_us,
        "effective_gbs": 2 * rows * vocab * 4 / (kernel_us * 1e-6) / 1e9,
    }
    if rows == 1:
        # GPU time alone: 100 calls captured in one CUDA graph, replayed.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                kern(z, table, state)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(100):
                kern(z, table, state)
        entry["graph_us_per_call"] = cuda_time_us(graph.replay, 20) / 100
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            kern(z, table, state)
        entry["host_launch_us"] = (time.perf_counter() - t0) * 1e6 / 200
        torch.cuda.synchronize()
    return entry


def write(result: dict[str, Any], out_dir: Path) -> Path:
    name = result["device"].lower().replace(" ", "-").replace("/", "-")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"gpu-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GPU serving path on {result['device']}",
        "",
        f"{result['date']}, torch {result['torch']}, Triton {result['triton']}, "
        f"`benchmarks/gpu_harness.py`{' --quick' if result['quick'] else ''}.",
        "",
        "## Correctness and host syncs",
        "",
        "| processor | same mask as reference | max abs diff | NaN | apply under sync_debug_mode=error |",
        "|---|---|---|---|---|",
    ]
    for k in ("v1", "v2"):
        c = result["check"][k]
        lines.append(
            f"| {k.upper()} | {c['same_mask']} | {c['max_abs_diff']:.2e} | {c['nan']} | "
            f"{'no sync' if c['no_host_sync'] else 'not checked (CPU)'} |"
        )
    if "timings" in result:
        t = result["timings"]
        lines += [
            "",
            f"## Kernel (fp32, all rows steered, alpha 0.1); copy bandwidth {t['copy_gbs']:.0f} GB/s",
            "",
            "| B x V | Triton kernel us | share of copy bandwidth | torch reference us | B=1: GPU us in a CUDA graph | B=1: host launch us |",
            "|---|---|---|---|---|---|",
        ]
        for e in t["shapes"]:
            lines.append(
                f"| {e['rows']} x {e['vocab']} | {e['kernel_us']:.1f} | {e['share_of_copy']:.0%} | "
                f"{e['torch_reference_us']:.1f} | {e.get('graph_us_per_call', float('nan')):.2f} | "
                f"{e.get('host_launch_us', float('nan')):.1f} |"
            )
    path = out_dir / f"gpu-{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vocab", type=int, default=152064, help="vocab of the correctness check")
    ap.add_argument("--quick", action="store_true", help="two timing shapes only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    install_vllm_stubs()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    with tempfile.TemporaryDirectory() as tmp:
        make_registry(Path(tmp) / "registry", args.vocab)
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "triton": triton_version,
            "quick": args.quick,
            "check": check(device, args.vocab),
        }
    print(json.dumps(result["check"], indent=2))
    if device.type == "cuda":
        result["timings"] = timings(device, args.quick)
        print(json.dumps(result["timings"], indent=2))
    path = write(result, args.out)
    print(f"wrote {path}")
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
