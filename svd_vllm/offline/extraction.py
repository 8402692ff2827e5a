"""Offline extraction: the precomputed steering vector and its calibrated strengths.

Two streaming passes over the calibration split, teacher-forced on the gold completion:

1. base + adapter: accumulate ``r = log p_phi - log p_theta`` into the two shift variants
   (probability-weighted and plain mean, float64 running sums of length V) and gather the
   exact-SVD calibration statistics;
2. adapter only: calibration statistics of ``dz`` built from each shift variant, and of the
   plain logit-bias baseline.

Items run in length-bucketed, right-padded batches (``ReferenceDecoder.teacher_forced``), and the
head computes logits only at completion positions. Whatever the weights' dtype, the per-token work
after the logits runs in float32 on chunks of at most ``precision.CHUNK_ELEMENTS`` logits, and the
sums in float64 on the model's device. Memory is O(V) for the sums, one batch's completion
logits in the model's dtype, one chunk of float32 work, and a few numbers per calibration token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.artifact import CalibrationStats, SteeringArtifact
from ..core.identity import model_identity, tokenizer_fingerprint
from ..core.steering import confidence_mask, exact_delta, log_ratio, precomputed_delta
from .calibration import DirectionStats, EstimatorResult, calibrate
from .precision import ROW_ELEMENTS, TOKENS_PER_PASS, float32_chunks
from .reference import ReferenceDecoder

__all__ = [
    "CalibrationItem",
    "EncodedItem",
    "ExtractionReport",
    "ShiftAccumulator",
    "encode_items",
    "extract_vector",
    "length_batches",
]

SHIFT_VARIANTS: tuple[str, ...] = ("prob", "mean")


@dataclass(frozen=True)
class CalibrationItem:
    """One teacher-forced calibration example: the prompt and its gold completion."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class EncodedItem:
    """A calibration item as token ids: the prompt is ``ids[:n_ctx]``, the completion the rest."""

    ids: list[int]
    n_ctx: int

    @property
    def n_labels(self) -> int:
        return len(self.ids) - self.n_ctx


def encode_items(
    dec: ReferenceDecoder, items: Sequence[CalibrationItem], max_length: int | None = None
) -> list[EncodedItem]:
    """Tokenise like vLLM does; an item over ``max_length`` tokens is a clear error."""
    limit = max_length or dec.max_length
    out = []
    for i, it in enumerate(items):
        ctx, cont = dec.continuation_ids(it.prompt, it.completion)
        if not ctx:
            raise ValueError(f"calibration item {i}: the prompt tokenises to nothing")
        if limit is not None and len(ctx) + len(cont) > limit:
            raise ValueError(
                f"calibration item {i} is {len(ctx) + len(cont)} tokens, over the maximum length "
                f"{limit}; raise --max-length (up to the model's context) or shorten the item"
            )
        out.append(EncodedItem(ctx + cont, len(ctx)))
    return out


def length_batches(
    items: Sequence[EncodedItem],
    batch_size: int,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Indices in batches of similar length (little padding): at most ``batch_size`` items and,
    past the first item of a batch, at most ``max_rows`` completion tokens and ``max_tokens``
    padded tokens (so activations stay bounded however long the prompts are)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda i: (len(items[i].ids), i))
    batches: list[list[int]] = []
    rows = 0
    for i in order:  # ascending length: item i is the longest of its batch so far
        n = items[i].n_labels
        fits = bool(batches) and len(batches[-1]) < batch_size
        fits = fits and (max_rows is None or rows + n <= max_rows)
        fits = fits and (
            max_tokens is None or (len(batches[-1]) + 1) * len(items[i].ids) <= max_tokens
        )
        if fits:
            batches[-1].append(i)
            rows += n
        else:
            batches.append([i])
            rows = n
    return batches


class ShiftAccumulator:
    """Running sums for ``s = sum_t w_t * r_t / sum_t w_t`` with ``w_t = p_phi,t`` or 1.

    The sums are float64 and live on the device of the logits (one copy of V, never T x V).
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.sum_pr = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.sum_p = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.sum_r = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, r: torch.Tensor, p: torch.Tensor) -> None:
        """Add rows of ``r`` (float32 ``[T, V]``) with the adapter's probabilities ``p``."""
        if not torch.isfinite(r).all():
            raise ValueError("non-finite log-ratio in calibration data")
        self.sum_pr += (p.double() * r.double()).sum(0)
        self.sum_p += p.double().sum(0)
        self.sum_r += r.double().sum(0)
        self.count += r.shape[0]

    def shift(self, variant: str) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration tokens were accumulated")
        if variant == "mean":
            s = self.sum_r / self.count
        elif variant == "prob":
            # Tokens the adapter never gave mass to get 0: they cannot be steered anyway.
            s = torch.where(self.sum_p > 0, self.sum_pr / self.sum_p.clamp_min(1e-300), 0.0)
        else:
            raise ValueError(f"unknown shift variant {variant!r}; use prob or mean")
        return s.float().cpu()


@dataclass
class ExtractionReport:
    """All calibration results: per direction (exact, each shift, logit-bias)."""

    results: dict[str, EstimatorResult]
    default_shift: str
    items: int
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "default_shift": self.default_shift,
            "items": self.items,
            "tokens": self.tokens,
            **self.extra,
            "directions": {
                k: {
                    "mu": v.mu,
                    "nll": v.nll,
                    "nll_unsteered": v.nll_unsteered,
                    "chosen": v.chosen,
                    "mu_bar": v.mu_bar,
                    "ci95": list(v.ci),
                }
                for k, v in self.results.items()
            },
        }


def _labels(items: Sequence[EncodedItem], batch: Sequence[int], device: torch.device):  # type: ignore[no-untyped-def]
    """Flat labels and item indices of a batch's completion tokens, in teacher_forced order."""
    labels = torch.tensor([t for i in batch for t in items[i].ids[items[i].n_ctx :]])
    owner = torch.tensor([i for i in batch for _ in range(items[i].n_labels)])
    return labels.to(device), owner


@dataclass
class _Passes:
    """One extraction's items and batches, and its one progress bar over both passes."""

    dec: ReferenceDecoder
    enc: Sequence[EncodedItem]
    batches: list[list[int]]
    alpha: float
    bar: Any

    def logits(self, batch: list[int], *, adapter: bool) -> torch.Tensor:
        return self.dec.teacher_forced(
            [self.enc[i].ids for i in batch], [self.enc[i].n_ctx for i in batch], adapter=adapter
        )

    def tokens(self, batch: list[int]) -> int:
        return sum(len(self.enc[i].ids) for i in batch)


def _accumulate(run: _Passes) -> tuple[ShiftAccumulator, DirectionStats]:
    """Pass 1 (base + adapter): the shift sums of ``r = log p_phi - log p_theta`` and the
    exact-SVD calibration statistics."""
    dec = run.dec
    acc = ShiftAccumulator(dec.vocab_size, dec.device)
    exact = DirectionStats()
    for batch in run.batches:
        z_a, z_b = run.logits(batch, adapter=True), run.logits(batch, adapter=False)
        labels, owner = _labels(run.enc, batch, dec.device)
        for c in float32_chunks(len(labels), dec.vocab_size):
            za, zb = z_a[c].float(), z_b[c].float()
            if not (torch.isfinite(za).all() and torch.isfinite(zb).all()):
                bad = sorted({int(i) for i in owner[c]})
                raise ValueError(f"calibration items {bad}: the model produced non-finite logits")
            r = log_ratio(za, zb)
            acc.add(r, torch.softmax(za, -1))
            mask = confidence_mask(za, run.alpha)
            exact.add(owner[c], za, exact_delta(za, zb), labels[c], mask)
        run.bar.update(2 * run.tokens(batch))
    return acc, exact


def _shift_statistics(
    run: _Passes, shifts: dict[str, torch.Tensor]
) -> tuple[dict[str, DirectionStats], dict[str, DirectionStats]]:
    """Pass 2 (adapter only): calibration statistics of the precomputed direction built from
    each shift variant, and of the plain logit-bias baseline."""
    dec = run.dec
    pre = {v: DirectionStats() for v in shifts}
    bias = {v: DirectionStats() for v in shifts}
    on_device = {v: s.to(dec.device) for v, s in shifts.items()}
    for batch in run.batches:
        z_a = run.logits(batch, adapter=True)
        labels, owner = _labels(run.enc, batch, dec.device)
        for c in float32_chunks(len(labels), dec.vocab_size):
            za = z_a[c].float()
            mask = confidence_mask(za, run.alpha)
            for v, s in on_device.items():
                pre[v].add(owner[c], za, precomputed_delta(za, s), labels[c], mask)
                bias[v].add(owner[c], za, s.expand_as(za), labels[c], mask)
        run.bar.update(run.tokens(batch))
    return pre, bias


def _choose(
    exact: DirectionStats,
    pre: dict[str, DirectionStats],
    bias: dict[str, DirectionStats],
    *,
    bootstrap_reps: int,
    seed: int,
) -> tuple[dict[str, EstimatorResult], str]:
    """Calibrate every direction; the default shift variant is the one whose precomputed
    direction reaches the lowest calibration NLL."""
    results: dict[str, EstimatorResult] = {
        "exact": calibrate(exact, bootstrap_reps=bootstrap_reps, seed=seed)
    }
    for v in SHIFT_VARIANTS:
        results[f"precomputed-{v}"] = calibrate(pre[v], bootstrap_reps=bootstrap_reps, seed=seed)
        # The logit-bias baseline: only the line search is meaningful (see the spec).
        results[f"logit-bias-{v}"] = calibrate(
            bias[v], estimators=("line_search",), bootstrap_reps=0, seed=seed
        )
    default = min(
        SHIFT_VARIANTS,
        key=lambda v: results[f"precomputed-{v}"].nll[results[f"precomputed-{v}"].chosen],
    )
    return results, default


def _calibration_stats(
    results: dict[str, EstimatorResult], default: str, items: int, tokens: int
) -> CalibrationStats:
    """What the artifact records of the calibration: every estimator's strength and NLL."""
    chosen = results[f"precomputed-{default}"]
    ex = results["exact"]
    estimators = {f"precomputed_{k}": x for k, x in chosen.mu.items()}
    estimators.update({f"exact_{k}": x for k, x in ex.mu.items()})
    estimators["logit_bias_beta"] = results[f"logit-bias-{default}"].mu_bar
    estimators["mu_bar_ci_low"], estimators["mu_bar_ci_high"] = (
        (chosen.ci[0], chosen.ci[1]) if all(math.isfinite(c) for c in chosen.ci) else (0.0, 0.0)
    )
    nll = {f"precomputed_{k}": x for k, x in chosen.nll.items()}
    nll.update({f"exact_{k}": x for k, x in ex.nll.items()})
    nll["unsteered"] = chosen.nll_unsteered
    nll["logit_bias"] = results[f"logit-bias-{default}"].nll["line_search"]
    return CalibrationStats(
        items=items,
        tokens=tokens,
        positions=chosen.positions,
        mu_mean=chosen.mu_mean,
        mu_median=chosen.mu_median,
        mu_std=chosen.mu_std,
        estimators=estimators,
        nll=nll,
    )


def extract_vector(
    dec: ReferenceDecoder,
    items: Sequence[CalibrationItem] | Iterable[CalibrationItem],
    *,
    name: str,
    alpha: float = 0.1,
    base_model: str | None = None,
    adapter: str | None = None,
    bootstrap_reps: int = 200,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    max_length: int | None = None,
    encoded: Sequence[EncodedItem] | None = None,
) -> tuple[SteeringArtifact, ExtractionReport]:
    """Estimate the shift and every strength on ``items``; return the default artifact.

    Accumulate (pass 1), statistics (pass 2), choose (calibration), build the artifact.
    ``batch_size`` items run per forward pass; ``max_length`` (default: the model's context)
    bounds an item's tokens. ``encoded`` passes items already tokenised (then ``items`` is
    ignored), e.g. for a benchmark on a model without a matching tokenizer.
    """
    if dec.adapter_dir is None:
        raise ValueError("extraction needs an adapter (warm-started model)")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    enc = list(encoded) if encoded is not None else encode_items(dec, list(items), max_length)
    if not enc:
        raise ValueError("the calibration split is empty")
    # Prompt learning prepends virtual tokens and PEFT drops position ids: one item per pass.
    size = 1 if dec.is_prompt_learning else batch_size
    batches = length_batches(
        enc, size, max_rows=max(1, ROW_ELEMENTS // dec.vocab_size), max_tokens=TOKENS_PER_PASS
    )
    total = sum(it.n_labels for it in enc)
    fed = sum(len(it.ids) for it in enc)

    t0 = time.perf_counter()
    bar = tqdm(total=3 * fed, desc="extract", unit="tok", unit_scale=True, disable=not progress)
    run = _Passes(dec, enc, batches, alpha, bar)
    acc, exact = _accumulate(run)
    shifts = {v: acc.shift(v) for v in SHIFT_VARIANTS}
    pre, bias = _shift_statistics(run, shifts)
    bar.close()
    seconds = time.perf_counter() - t0

    results, default = _choose(exact, pre, bias, bootstrap_reps=bootstrap_reps, seed=seed)
    chosen = results[f"precomputed-{default}"]
    art = SteeringArtifact.create(
        shifts[default],
        name=name,
        base_model=base_model or model_identity(dec.base_dir),
        adapter=adapter or model_identity(dec.adapter_dir),
        vocab_size=dec.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(dec.tokenizer),
        mu_bar=chosen.mu_bar,
        mu_bar_exact=results["exact"].mu_bar,
        alpha=alpha,
        shift_weighting=default,
        estimator=chosen.chosen,
        calibration=_calibration_stats(results, default, len(enc), total),
    )
    report = ExtractionReport(
        results=results,
        default_shift=default,
        items=len(enc),
        tokens=total,
        extra={
            "seconds_passes": seconds,
            "tokens_fed": 3 * fed,
            "batches": len(batches),
            "device": str(dec.device),
            "dtype": str(dec.dtype).removeprefix("torch."),
        },
    )
    return art, report
