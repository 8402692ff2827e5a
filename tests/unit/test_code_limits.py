"""Limits that keep the code readable: how long a function may be, and how little of the tree
may opt out of the formatter."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The longest function allowed, by folder: the engine plugin and the sidecar are read most.
LIMITS = {"svd_vllm/vllm/": 60, "server/": 60, "svd_vllm/": 80}
MAX_FMT_SKIPS = 10


def _limit(rel: str) -> int:
    return next(n for prefix, n in LIMITS.items() if rel.startswith(prefix))


def test_no_function_is_longer_than_its_folder_allows() -> None:
    too_long = []
    for path in [*(ROOT / "svd_vllm").rglob("*.py"), *(ROOT / "server").rglob("*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > _limit(rel):
                    too_long.append(f"{rel}:{node.lineno} {node.name} ({lines} > {_limit(rel)})")
    assert not too_long, "split these functions:\n" + "\n".join(too_long)


def test_the_formatter_is_rarely_switched_off() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    skips = sum((ROOT / f).read_text().count("# fmt: skip") for f in tracked if (ROOT / f).exists())
    assert skips <= MAX_FMT_SKIPS, f"{skips} '# fmt: skip' markers (at most {MAX_FMT_SKIPS})"
