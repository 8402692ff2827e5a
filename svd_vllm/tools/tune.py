"""``svd-vllm tune``: choose a vector's default scale on your own labelled data, through vLLM.

The calibrated strength minimises an NLL on calibration tokens; task accuracy can disagree (it
did, on a held-out task). ``tune`` measures what users get: it sends a labelled dev set through
the serving path (vLLM with the plugin) at a sweep of scales, greedy, and scores

* the generation: correct when it starts with the gold option (``generation_correct``);
* where every option's first token differs, also the steered probability of each option's first
  token: vLLM returns the log-probabilities of chosen token ids (``logprob_token_ids``), after the
  logits processors when the server runs with ``--logprobs-mode processed_logprobs`` (the log
  softmax of the steered logits, before temperature). A server in the default ``raw_logprobs``
  mode returns the adapter's unsteered values: ``tune`` detects that and leaves the score out.

Scale 0 is the plain adapter; a negative scale steers back toward the base model. Each scale
gets its accuracy with a paired bootstrap 95% CI against scale 0 and the number of answers it
changed. ``--apply`` sets the vector's default scale (and alpha, if swept) to the best point only
when that point's CI lower bound is above 0; the registry's versioning means running requests
keep the version they were admitted with.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ..offline.evaluation import generation_correct, paired_bootstrap
from ..offline.tasks import Item
from ..registry.request import ALPHA_KEY, ENABLE_KEY, SCALE_KEY, VECTOR_KEY

__all__ = [
    "DEFAULT_SCALES",
    "Point",
    "TuneError",
    "TuneReport",
    "apply_choice",
    "choose",
    "run_tune",
    "write_report",
]

#: The sweep when none is given: 0 is the plain adapter, -0.5 steers back toward the base.
DEFAULT_SCALES = (-0.5, 0.0, 0.25, 0.5, 1.0, 2.0)
#: Connection attempts retried per request (httpx: 0.5 s back-off, doubling). A request that
#: never connected never ran, so sending it again is safe; a busy CPU server can miss a connect
#: deadline without being gone, and one missed connect must not lose a whole sweep.
CONNECT_RETRIES = 5


class TuneError(Exception):
    """Bad input or an unusable stack: said plainly, nothing written."""


@dataclass
class Point:
    """One (scale, alpha) of the sweep and what it scored on every dev item."""

    scale: float
    alpha: float | None
    texts: list[str]
    correct: list[float]
    first_token: list[float] | None = None  # per first-token-scorable item
    accuracy: float = 0.0
    vs_adapter: dict[str, float] = field(default_factory=dict)  # paired bootstrap vs scale 0
    changed: int = 0  # answers that differ from scale 0's
    first_token_accuracy: float | None = None
    first_token_vs_adapter: dict[str, float] | None = None

    @property
    def label(self) -> str:
        return f"{self.scale:g}" + ("" if self.alpha is None else f" (alpha {self.alpha:g})")


@dataclass
class TuneReport:
    adapter: str
    vector: str
    url: str
    n: int
    points: list[Point]
    first_token_items: int  # items whose options' first tokens all differ
    first_token_note: str
    chosen: dict[str, Any]
    seconds: float
    max_tokens: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for p in out["points"]:
            p.pop("texts")
        return out


# -- the sweep ---------------------------------------------------------------------------------
def _xargs(vector: str, scale: float, alpha: float | None) -> dict[str, Any]:
    if scale == 0.0:
        return {ENABLE_KEY: 0}  # the plain adapter
    xargs: dict[str, Any] = {ENABLE_KEY: 1, VECTOR_KEY: vector, SCALE_KEY: scale}
    if alpha is not None:
        xargs[ALPHA_KEY] = alpha
    return xargs


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        r = await client.post(url, json=body)
    except httpx.HTTPError as e:
        raise TuneError(f"vLLM at {url} failed: {type(e).__name__}: {e}") from e
    if r.status_code != 200:
        raise TuneError(f"vLLM refused a request ({r.status_code}): {r.text[:500]}")
    out: dict[str, Any] = r.json()
    return out


async def _preflight(client: httpx.AsyncClient, url: str, adapter: str) -> None:
    try:
        r = await client.get(f"{url}/v1/models", timeout=10)
        served = [m["id"] for m in r.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise TuneError(
            f"vLLM is not reachable at {url} ({type(e).__name__}): start it, or "
            "let tune start one with --model and --lora"
        ) from e
    if adapter not in served:
        raise TuneError(
            f"vLLM at {url} serves no model {adapter!r} (it serves: {', '.join(served)})"
        )


async def _first_token_ids(
    client: httpx.AsyncClient, url: str, adapter: str, items: Sequence[Item]
) -> list[list[int] | None]:
    """Each item's options' first token ids (as the reference decoder tokenises an option: on
    its own), or None where two options share their first token."""

    async def first(text: str) -> int | None:
        body = {"model": adapter, "prompt": text, "add_special_tokens": False}
        ids = (await _post(client, f"{url}/tokenize", body)).get("tokens") or []
        return int(ids[0]) if ids else None

    out: list[list[int] | None] = []
    for item in items:
        ids = [await first(o["text"]) for o in item.options]
        ok = len(ids) > 1 and None not in ids and len(set(ids)) == len(ids)
        out.append([int(i) for i in ids if i is not None] if ok else None)
    return out


async def _sweep(
    url: str,
    adapter: str,
    vector: str,
    items: Sequence[Item],
    grid: Sequence[tuple[float, float | None]],
    max_tokens: int,
    stop: Sequence[str],
    concurrency: int,
    progress: bool,
) -> tuple[list[Point], int, str]:
    from tqdm import tqdm

    sem = asyncio.Semaphore(concurrency)
    transport = httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES)
    timeout = httpx.Timeout(600, connect=30)
    async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
        await _preflight(client, url, adapter)
        await _probe(client, url, adapter, vector, items[0], grid)
        option_ids = await _first_token_ids(client, url, adapter, items)
        scorable = [i for i, ids in enumerate(option_ids) if ids is not None]
        bar = tqdm(total=len(grid) * len(items), desc="tune", unit="req", disable=not progress)

        async def answer(i: int, xargs: dict[str, Any]) -> tuple[str, list[float] | None]:
            """The greedy answer; for a first-token-scorable item, in the same request, the
            log-probabilities of each option's first token at the first position."""
            body: dict[str, Any] = {
                "model": adapter,
                "prompt": items[i].prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "vllm_xargs": xargs,
            }
            if stop:
                body["stop"] = list(stop)
            ids = option_ids[i]
            if ids is not None:
                body.update(logprobs=1, logprob_token_ids=ids, return_tokens_as_token_ids=True)
            async with sem:
                out = await _post(client, f"{url}/v1/completions", body)
            bar.update()
            choice = out["choices"][0]
            if ids is None:
                return str(choice["text"]), None
            try:
                top = choice["logprobs"]["top_logprobs"][0]
                return str(choice["text"]), [float(top[f"token_id:{t}"]) for t in ids]
            except (KeyError, IndexError, TypeError):
                return str(choice["text"]), None  # no logprobs of chosen ids from this vLLM

        # Every point at once: the engine batches across scales (a CPU engine is far from
        # saturated by one scale's requests).
        try:
            answers = await asyncio.gather(
                *(answer(i, _xargs(vector, s, a)) for s, a in grid for i in range(len(items)))
            )
        finally:
            bar.close()
    points, logprobs = [], []
    for k, (scale, alpha) in enumerate(grid):
        rows = answers[k * len(items) : (k + 1) * len(items)]
        texts = [t for t, _ in rows]
        correct = [
            float(generation_correct(t, it.options, it.gold))
            for t, it in zip(texts, items, strict=True)
        ]
        points.append(Point(scale, alpha, texts, correct))
        logprobs.append([rows[i][1] for i in scorable])
    note = _score_first_tokens(points, logprobs, [items[i] for i in scorable])
    return points, len(scorable), note


async def _probe(
    client: httpx.AsyncClient,
    url: str,
    adapter: str,
    vector: str,
    item: Item,
    grid: Sequence[tuple[float, float | None]],
) -> None:
    """One steered request before the sweep: an unknown or unservable vector is vLLM's 400,
    said once (nothing to probe when every point is scale 0, the plain adapter)."""
    probe = next(((s, a) for s, a in grid if s != 0.0), None)
    if probe is None:
        return
    body = {"model": adapter, "prompt": item.prompt, "max_tokens": 1, "temperature": 0}
    await _post(client, f"{url}/v1/completions", body | {"vllm_xargs": _xargs(vector, *probe)})


def _score_first_tokens(
    points: list[Point], logprobs: list[list[list[float] | None]], items: list[Item]
) -> str:
    """Fill each point's first-token accuracy; the note says why it is missing, if it is."""
    if not items:
        return "no item has options whose first tokens all differ"
    if any(lp is None for lps in logprobs for lp in lps):
        return "this vLLM does not return the log-probabilities of chosen token ids"
    base = [i for i, p in enumerate(points) if p.scale == 0.0]
    steered = [i for i, p in enumerate(points) if p.scale != 0.0]
    if base and steered and all(logprobs[i] == logprobs[base[0]] for i in steered):
        return (
            "the logprobs did not move with steering: vLLM returns raw logprobs (start it "
            "with --logprobs-mode processed_logprobs)"
        )
    for p, lps in zip(points, logprobs, strict=True):
        p.first_token = [
            float(int(np.argmax(np.asarray(lp))) == it.gold)
            for lp, it in zip(lps, items, strict=True)
        ]
    return "steered first-token probabilities (--logprobs-mode processed_logprobs)"


def _summarise(points: list[Point]) -> None:
    base = next((p for p in points if p.scale == 0.0), None)
    if base is None:
        raise TuneError("the sweep needs scale 0 (the plain adapter) to compare against")
    for p in points:
        p.accuracy = float(np.mean(p.correct))
        p.vs_adapter = paired_bootstrap(p.correct, base.correct)
        p.changed = sum(a != b for a, b in zip(p.texts, base.texts, strict=True))
        if p.first_token is not None and base.first_token is not None:
            p.first_token_accuracy = float(np.mean(p.first_token))
            p.first_token_vs_adapter = paired_bootstrap(p.first_token, base.first_token)


def choose(points: Sequence[Point]) -> dict[str, Any]:
    """The best point by generation accuracy (ties: the smaller |scale|), and whether it may
    be applied: only when its CI against the plain adapter lies above 0."""
    candidates = [p for p in points if p.scale != 0.0]
    if not candidates:
        return {"scale": None, "apply": False, "reason": "the sweep has no steered scale"}
    best = max(candidates, key=lambda p: (p.vs_adapter["diff"], -abs(p.scale)))
    d = best.vs_adapter
    ci = f"{100 * d['diff']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
    out = {
        "scale": best.scale,
        "alpha": best.alpha,
        "diff": d["diff"],
        "lo": d["lo"],
        "hi": d["hi"],
    }
    if d["diff"] <= 0:
        return {
            **out,
            "apply": False,
            "reason": f"no scale beats the plain adapter (best: scale {best.label}, {ci})",
        }
    if not d["lo"] > 0:
        return {
            **out,
            "apply": False,
            "reason": f"scale {best.label} is best ({ci}) but its 95% CI includes 0: "
            "not enough evidence to change the default",
        }
    return {**out, "apply": True, "reason": f"scale {best.label}: {ci} vs the plain adapter"}


def run_tune(
    url: str,
    adapter: str,
    vector: str,
    items: Sequence[Item],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    alphas: Sequence[float] = (),
    max_tokens: int = 32,
    stop: Sequence[str] = (),
    concurrency: int = 32,
    progress: bool = True,
) -> TuneReport:
    """Sweep ``scales`` (x ``alphas``: each alpha beside the vector's own) through the vLLM at
    ``url`` and score every point. ``TuneError`` for bad input or an unusable stack."""
    if not items:
        raise TuneError("the dev set is empty")
    bad = [s for s in (*scales, *alphas) if not math.isfinite(s)]
    if bad:
        raise TuneError(f"scales and alphas must be finite numbers, got {bad[0]!r}")
    if 0.0 not in scales:
        scales = (0.0, *scales)
    grid: list[tuple[float, float | None]] = [(s, None) for s in scales]
    grid += [(s, a) for a in alphas for s in scales if s != 0.0]
    t0 = time.time()
    points, n_first, note = asyncio.run(
        _sweep(
            url.rstrip("/"), adapter, vector, items, grid, max_tokens, stop, concurrency, progress
        )
    )
    _summarise(points)
    return TuneReport(
        adapter=adapter,
        vector=vector,
        url=url,
        n=len(items),
        points=points,
        first_token_items=n_first,
        first_token_note=note,
        chosen=choose(points),
        seconds=time.time() - t0,
        max_tokens=max_tokens,
    )


# -- the report ------------------------------------------------------------------------------
def _ci(d: dict[str, float] | None) -> str:
    if not d:
        return ""
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def markdown(report: TuneReport) -> str:
    ft = report.first_token_items and report.points[0].first_token is not None
    head = ["scale", "accuracy", "Δ vs adapter [95% CI]", "answers changed"]
    if ft:
        head += [f"first-token acc. (n = {report.first_token_items})", "Δ [95% CI]"]
    lines = [
        f"# `svd-vllm tune`: vector {report.vector}, adapter {report.adapter}",
        "",
        f"n = {report.n} dev items, greedy generation through vLLM at {report.url} "
        f"(at most {report.max_tokens} tokens); Δ = paired difference to scale 0 (the plain "
        "adapter), 95% bootstrap CI over items. First-token score: "
        f"{report.first_token_note}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p in report.points:
        row = [
            p.label,
            f"{100 * p.accuracy:.1f}",
            "—" if p.scale == 0.0 else _ci(p.vs_adapter),
            str(p.changed),
        ]
        if ft:
            row += [
                f"{100 * (p.first_token_accuracy or 0):.1f}",
                "—" if p.scale == 0.0 else _ci(p.first_token_vs_adapter),
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"**Choice:** {report.chosen['reason']}.", ""]
    return "\n".join(lines)


def plot(report: TuneReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    alphas = sorted({p.alpha for p in report.points if p.alpha is not None})
    for alpha in [None, *alphas]:
        pts = sorted(
            (p for p in report.points if p.alpha == alpha or p.scale == 0.0), key=lambda p: p.scale
        )
        xs = [p.scale for p in pts]
        ys = [100 * p.vs_adapter["diff"] for p in pts]
        err = [
            [100 * (p.vs_adapter["diff"] - p.vs_adapter["lo"]) for p in pts],
            [100 * (p.vs_adapter["hi"] - p.vs_adapter["diff"]) for p in pts],
        ]
        label = "vector's alpha" if alpha is None else f"alpha {alpha:g}"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0, color="#888888", lw=0.8)
    ax.set_xlabel("svd_scale (0 = the plain adapter)")
    ax.set_ylabel("accuracy − adapter (points), 95% CI")
    ax.set_title(f"vector {report.vector}, adapter {report.adapter}, n = {report.n}", fontsize=9)
    if alphas:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: TuneReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "tune.json", "md": out_dir / "tune.md", "png": out_dir / "tune.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2))
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def apply_choice(registry_root: Path | None, report: TuneReport) -> str:
    """Set the vector's default scale (and alpha) to the chosen point, if it may be applied;
    returns what was done. Goes through the registry's versioning: new requests pick it up,
    running ones keep their pinned version."""
    from ..registry import Registry

    chosen = report.chosen
    if not chosen["apply"]:
        return f"left {report.vector} as it was: {chosen['reason']}"
    changes: dict[str, Any] = {"default_scale": chosen["scale"]}
    if chosen.get("alpha") is not None:
        changes["alpha_override"] = chosen["alpha"]
    entry = Registry(registry_root).update(report.vector, **changes)
    return (
        f"set {report.vector}'s default scale to {chosen['scale']:g} ({entry.key}): "
        f"{chosen['reason']}"
    )
