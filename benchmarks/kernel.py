"""Torch-only benchmark of the steering kernel at serving shapes, with achieved bandwidth.

Times the processor's kernel (``steer_table_rows_``: softmax, one [n,V]x[V,k] product for
<p, s>, the confidence mask, the steered values on the mask, -inf elsewhere) and the dense
alternative (``steer_precomputed_rows``) for batch 1..512, vocab 32k..256k, fp32 / bf16
logits (bf16 rows are converted to float32 and back, as the processor does). Bandwidth is
the minimum traffic (logits read + written, one vector read) over the time: the kernel's
distance to the memory-bandwidth bound, shown against the device's measured copy bandwidth
(and ``--peak-gbs``, the datasheet figure, when given: 3350 for an H100 SXM). Runs on CUDA when available (CUDA events), else CPU.

    python -m benchmarks.kernel [--quick] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from svd_vllm.core.steering import steer_table_rows_

RESULTS = Path(__file__).resolve().parent / "results"


def steer_precomputed_rows(
    logits: torch.Tensor,
    shift: torch.Tensor,
    mu: torch.Tensor,
    log_alpha: torch.Tensor,
) -> torch.Tensor:
    """The serving hot path: filtered precomputed SVD on ``[n, V]`` rows in few passes.

    Equals ``steer(z, precomputed_delta(z, shift), mu, confidence_mask(z, alpha))`` with
    ``log_alpha = log(alpha)``; ``mu`` and ``log_alpha`` are ``[n, 1]`` float32, ``shift`` is
    ``[n, V]`` or ``[V]`` float32. Returns float32 ``[n, V]`` (a new tensor).
    """
    z = logits.float()
    zmax = z.amax(dim=-1, keepdim=True)
    finite_max = torch.isfinite(zmax)
    zmax_safe = torch.where(finite_max, zmax, torch.zeros_like(zmax))
    p = torch.exp(z - zmax_safe)  # all -inf rows: exp(-inf) = 0
    total = p.sum(dim=-1, keepdim=True)
    p.div_(torch.where(total > 0, total, torch.ones_like(total)))
    ps = (
        (p * shift).sum(dim=-1, keepdim=True)
        if shift.dim() == 1
        else torch.linalg.vecdot(p, shift).unsqueeze(-1)
    )
    # z + mu * (-p * (s - <p, s>)) == z + p * (mu * <p, s> - mu * s)
    coef = torch.addcmul(mu * ps, shift, -mu) if shift.dim() > 1 else mu * ps - mu * shift
    keep = z >= zmax + log_alpha
    out = torch.addcmul(z, p, coef)
    # Tokens outside the mask, -inf tokens and all -inf rows end up -inf (rows stay unchanged).
    return out.masked_fill_(~keep | ~finite_max, -math.inf)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(
    n: int, vocab: int, dtype: torch.dtype, device: torch.device, reps: int, kernel: str
) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    base = (torch.randn(n, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    table = torch.randn(4, vocab, generator=g).to(device)
    used = torch.tensor([2], device=device)
    row_vec = torch.zeros(n, dtype=torch.long, device=device)
    mu = torch.full((n,), -1.0, device=device)
    log_alpha = torch.full((n,), math.log(0.1), device=device)

    def step(z: torch.Tensor) -> torch.Tensor:
        if kernel == "sparse":
            zf = z if z.dtype == torch.float32 else z.float()
            steer_table_rows_(zf, table, used, row_vec, mu, log_alpha)
            return zf if z.dtype == torch.float32 else zf.to(z.dtype)
        out = steer_precomputed_rows(z, table[2], mu[:, None], log_alpha[:, None])
        return out.to(z.dtype)

    bufs = [base.clone() for _ in range(reps + 3)]
    for b in bufs[:3]:
        step(b)
    _sync(device)
    times = []
    for b in bufs[3:]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(b)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    elem = torch.finfo(dtype).bits // 8
    nbytes = 2 * n * vocab * elem + vocab * 4
    return {
        "kernel": kernel,
        "batch": n,
        "vocab": vocab,
        "dtype": str(dtype).replace("torch.", ""),
        "us": 1e6 * t,
        "GB_s": nbytes / t / 1e9,
        "bytes": nbytes,
    }


def copy_bandwidth(device: torch.device, mbytes: int = 256, reps: int = 10) -> float:
    """Achievable memory bandwidth here: a large device-to-device copy, GB/s (read + write)."""
    src = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--peak-gbs", type=float, help="device memory bandwidth for the roofline (GB/s)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        batches, vocabs = [1, 8, 64, 256, 512], [32000, 49152, 152064, 262144]
        reps = args.reps or 50
    else:
        name = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
        batches, vocabs = (
            ([1, 8, 64], [32000, 152064])
            if args.quick
            else ([1, 8, 64, 256, 512], [32000, 49152, 152064, 262144])
        )
        reps = args.reps or 10
    copy_gbs = copy_bandwidth(device)
    print(f"device copy bandwidth: {copy_gbs:.1f} GB/s", flush=True)
    rows = []
    for kernel in ("sparse", "dense"):
        for dtype in (torch.float32, torch.bfloat16):
            for vocab in vocabs:
                for n in batches:
                    if device.type == "cpu" and n * vocab > 256 * 152064:
                        continue
                    r = run_case(n, vocab, dtype, device, reps, kernel)
                    rows.append(r)
                    print(
                        f"{kernel:6s} {r['dtype']:8s} vocab={vocab:6d} batch={n:3d}: {r['us']:10.1f} us "
                        f"{r['GB_s']:7.1f} GB/s",
                        flush=True,
                    )
    slug = "gpu-" + name.lower().replace(" ", "-") if device.type == "cuda" else "cpu"
    out = args.out or RESULTS / f"kernel-{slug}.json"
    report = {
        "device": name,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "peak_GB_s": args.peak_gbs,
        "copy_GB_s": copy_gbs,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kernel, marker in (("sparse", "o"), ("dense", "s")):
        for dtype, color in (("float32", "#1f77b4"), ("bfloat16", "#ff7f0e")):
            pts = [r for r in report["rows"] if r["kernel"] == kernel and r["dtype"] == dtype]
            ax.scatter(
                [r["bytes"] / 1e6 for r in pts],
                [r["GB_s"] for r in pts],
                marker=marker,
                color=color,
                label=f"{kernel} {dtype}",
                alpha=0.8,
            )
    if report.get("peak_GB_s"):
        ax.axhline(report["peak_GB_s"], color="black", ls="--", lw=1, label="memory bandwidth")
        ax.axhline(
            report["peak_GB_s"] / 1.5, color="gray", ls=":", lw=1, label="bound / 1.5 (goal)"
        )
    if report.get("copy_GB_s"):
        ax.axhline(
            report["copy_GB_s"],
            color="#2ca02c",
            ls="--",
            lw=1,
            label=f"measured copy bandwidth ({report['copy_GB_s']:.0f} GB/s)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("minimum bytes moved per call (MB)")
    ax.set_ylabel("achieved GB/s")
    ax.set_title(f"Steering kernel, {report['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
