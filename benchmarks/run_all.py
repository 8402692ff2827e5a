"""`make bench`: every CPU benchmark in turn, each one's wall time written next to its results.

Runs, in this order (each script's docstring says what it measures): the kernel at serving
shapes, the processor's ``apply`` (and the registered-vectors scale), ``vllm bench serve``
configurations, accuracy through the vLLM path vs the reference decoder, the sidecar, the
quick accuracy study. The full accuracy studies (``benchmarks/accuracy.py`` without
``--quick``, and ``--model gemma3-270m``) take hours on 2 cores and are run by hand.

    python -m benchmarks.run_all [--only serving ...]

Writes ``benchmarks/results/bench-times.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS: dict[str, list[str]] = {
    "kernel": ["kernel"],
    "processor": ["processor", "--skip-vllm"],
    "serving": ["serving"],
    "serving_accuracy": ["serving_accuracy"],
    "sidecar": ["sidecar"],
    "accuracy_quick": ["accuracy", "--quick"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", nargs="+", choices=list(STEPS))
    args = ap.parse_args(argv)
    times: dict[str, float] = {}
    failed: list[str] = []
    t0 = time.time()
    for name, cmd in STEPS.items():
        if args.only and name not in args.only:
            continue
        print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
        t = time.time()
        rc = subprocess.call(
            [sys.executable, "-m", f"benchmarks.{cmd[0]}", *cmd[1:]], cwd=HERE.parent
        )
        times[name] = time.time() - t
        print(
            f"[bench] {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {times[name] / 60:.1f} min",
            flush=True,
        )
        if rc != 0:
            failed.append(name)
    total = time.time() - t0
    report = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": times,
        "total_seconds": total,
        "failed": failed,
    }
    out = HERE / "results" / "bench-times.json"
    out.write_text(json.dumps(report, indent=2))
    lines = [
        "# `make bench` wall times (this 2-core CPU machine)",
        "",
        f"{report['created']}.",
        "",
        "| step | minutes |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in times.items()]
    lines += [f"| **total** | **{total / 60:.1f}** |", ""]
    if failed:
        lines.append(f"Failed: {', '.join(failed)}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
