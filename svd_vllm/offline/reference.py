"""The reference decoder: exact and precomputed SVD on transformers + peft.

It is the oracle for every test and the paper-faithful number in every benchmark, so generation
favours clarity over speed: one sequence at a time, float32 logits, the steering math from
``svd_vllm.core.steering``. ``svd-exact`` gets the base distribution from the same backbone with
the adapter disabled at every step (two forward passes per token), as the paper does.

Teacher-forced scoring, which extraction and evaluation spend their time in, is batched:
``teacher_forced`` runs a right-padded batch in one pass and computes the output head only at the
positions asked for (a pre-hook on the head gathers them), so an 8B model with a 128k vocabulary
never materialises ``[batch, length, vocab]`` logits. Weights load once, on the device, in the
dtype ``precision.resolve`` picks; the base logits come from the same weights with the adapter
disabled.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.artifact import SteeringArtifact
from ..core.steering import MODES, Mode, svd_logits
from .precision import resolve

__all__ = ["GenerationResult", "OptionScore", "ReferenceDecoder", "sample_next"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    mode: str
    mu: float | None = None
    alpha: float | None = None
    finished_by: str = "length"  # "length" | "eos"


@dataclass
class OptionScore:
    """Teacher-forced log-likelihood of one continuation."""

    logprob: float
    n_tokens: int
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.n_tokens, 1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Greedy when ``temperature == 0``; else temperature, top-k, top-p sampling (vLLM's order)."""
    z = logits.float()
    if temperature <= 0:
        return int(z.argmax())
    z = z / temperature
    if top_k and top_k > 0 and top_k < z.numel():
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1.0:
        srt, idx = torch.sort(z, descending=True)
        probs = torch.softmax(srt, dim=-1)
        cum = probs.cumsum(-1)
        drop = (cum - probs) > top_p
        srt = srt.masked_fill(drop, -math.inf)
        z = torch.full_like(z, -math.inf).scatter(0, idx, srt)
    probs = torch.softmax(z, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class ReferenceDecoder:
    """A base model, optionally a PEFT adapter on it, optionally a steering artifact."""

    def __init__(
        self,
        base_dir: str | Path,
        adapter_dir: str | Path | None = None,
        *,
        vector: SteeringArtifact | None = None,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        """Load ``base_dir`` (and the PEFT adapter) once, on ``device``, in ``dtype``.

        ``device``/``dtype`` take ``"auto"`` (see ``precision``); the library defaults stay CPU
        float32, which the parity tests with vLLM need; the CLI and benchmarks pass ``auto``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        place = resolve(device, dtype)
        kwargs: dict[str, Any] = {"dtype": place.dtype}
        if place.device.type == "cuda":
            kwargs["device_map"] = {"": str(place.device)}  # straight onto the GPU
        model: Any = AutoModelForCausalLM.from_pretrained(Path(base_dir), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(Path(base_dir))
        self._attach(model, tokenizer, place.device, base_dir, adapter_dir)
        if vector is not None:
            self.set_vector(vector)

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        base_dir: str | Path = "<in-memory>",
        adapter_dir: str | Path | None = None,
    ) -> ReferenceDecoder:
        """Wrap a model already in memory (a ``PeftModel`` when ``adapter_dir`` is given).

        For benchmarks that build a model from a config on the device; ``adapter_dir`` then only
        names the adapter (its weights are those already in ``model``).
        """
        self = cls.__new__(cls)
        device = next(model.parameters()).device
        self._attach(model, tokenizer, device, base_dir, adapter_dir, loaded=True)
        return self

    def _attach(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        base_dir: str | Path,
        adapter_dir: str | Path | None,
        *,
        loaded: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.device = device
        self.tokenizer = tokenizer
        self.is_prompt_learning = False
        if self.adapter_dir is not None and not loaded:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter_dir)
        if self.adapter_dir is not None:
            cfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", ""))
            self.is_prompt_learning = bool(getattr(cfg, "is_prompt_learning", False))
        self.model = model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.vector: SteeringArtifact | None = None

    # -- configuration -------------------------------------------------------------------
    def set_vector(self, vector: SteeringArtifact | None) -> None:
        if vector is not None and vector.meta.vocab_size != self.vocab_size:
            raise ValueError(
                f"vector {vector.name!r} has vocab_size {vector.meta.vocab_size} but the model "
                f"has {self.vocab_size}"
            )
        self.vector = vector

    def _resolve(
        self, mode: str, mu: float | None, alpha: float | None, has_shift: bool = False
    ) -> tuple[float, float]:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode in ("base", "adapter"):
            return 0.0, 1.0
        if mode != "base" and self.adapter_dir is None and mode != "logit-bias":
            raise ValueError(f"mode {mode!r} needs an adapter")
        if mode in ("svd-precomputed", "logit-bias") and self.vector is None and not has_shift:
            raise ValueError(f"mode {mode!r} needs a steering vector (--vector)")
        meta = self.vector.meta if self.vector is not None else None
        if mu is None:
            if meta is None:
                raise ValueError(f"mode {mode!r} needs mu (no steering vector to take it from)")
            if mode == "svd-exact":
                if meta.mu_bar_exact is None:
                    raise ValueError(f"vector {meta.name!r} has no mu_bar_exact; pass mu")
                mu = meta.mu_bar_exact
            elif mode == "logit-bias":
                mu = meta.calibration.estimators.get("logit_bias_beta")
                if mu is None:
                    raise ValueError(
                        f"vector {meta.name!r} has no calibrated logit-bias beta; pass mu"
                    )
            else:
                mu = meta.mu_bar
        if alpha is None:
            alpha = meta.alpha if meta is not None else 0.1
        if not math.isfinite(mu):
            raise ValueError(f"mu must be finite, got {mu}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        return float(mu), float(alpha)

    def _shift(self) -> torch.Tensor | None:
        return None if self.vector is None else self.vector.shift.to(self.device)

    def _needs(self, mode: str) -> tuple[bool, bool]:
        """(adapter logits needed, base logits needed) for a mode."""
        need_base = mode in ("base", "svd-exact")
        need_adapter = mode != "base"
        return need_adapter, need_base

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    # -- forward passes ------------------------------------------------------------------
    @torch.no_grad()
    def _forward(
        self, ids: torch.Tensor, *, adapter: bool, cache: Any = None
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"input_ids": ids.unsqueeze(0).to(self.device)}
        if cache is not None:
            kwargs.update(past_key_values=cache, use_cache=True)
        elif not self.is_prompt_learning:
            kwargs.update(use_cache=True)
        if adapter or self.adapter_dir is None:
            out = self.model(**kwargs)
        else:
            with self.model.disable_adapter():
                out = self.model(**kwargs)
        # Prompt tuning prepends virtual-token positions to the logits: keep the real ones.
        return out.logits[0, -ids.shape[0] :].float(), getattr(out, "past_key_values", None)

    @torch.no_grad()
    def logits(self, ids: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Teacher-forced ``(z_adapter, z_base)`` at each position: float32 ``[T, V]``."""
        t = torch.tensor(list(ids), dtype=torch.long)
        z_base, _ = self._forward(t, adapter=False)
        z_adapter = self._forward(t, adapter=True)[0] if self.adapter_dir is not None else None
        return z_adapter, z_base

    @torch.no_grad()
    def adapter_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced adapter logits only (one forward pass): float32 ``[T, V]``."""
        if self.adapter_dir is None:
            raise ValueError("no adapter loaded")
        return self._forward(torch.tensor(list(ids), dtype=torch.long), adapter=True)[0]

    @contextlib.contextmanager
    def _head_at(self, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[list[bool]]:
        """While active, the output head sees only the hidden states at ``(rows, cols)``
        (``cols`` counted from the end of the sequence, so prompt-tuning's virtual tokens, which
        PEFT prepends, do not shift them): it returns ``[1, N, V]`` logits instead of
        ``[B, T, V]``. Yields a flag that says whether the head ran through the hook."""
        fired = [False]

        def gather(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            hidden = args[0]
            fired[0] = True
            return (hidden[rows, hidden.shape[1] - cols].unsqueeze(0), *args[1:])

        handle = self.model.get_output_embeddings().register_forward_pre_hook(gather)
        try:
            yield fired
        finally:
            handle.remove()

    @torch.inference_mode()
    def teacher_forced(
        self, seqs: Sequence[Sequence[int]], starts: Sequence[int], *, adapter: bool
    ) -> torch.Tensor:
        """Logits that predict ``seq[start:]`` of every sequence, in one right-padded pass.

        Returns ``[N, V]`` in the model's dtype on its device, rows in order (sequence by
        sequence, position by position), ``N = sum(len(seq) - start)``. Right padding with the
        attention mask leaves every real position's logits as if the sequence ran alone (a
        causal model never looks right), and the default positions stay correct.
        """
        if len(seqs) != len(starts):
            raise ValueError("one start per sequence")
        lengths = [len(s) for s in seqs]
        if any(not 1 <= st < n for st, n in zip(starts, lengths, strict=True)):
            raise ValueError("each sequence needs a prompt token and a token to predict")
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        row_list: list[int] = []
        col_list: list[int] = []
        for r, (seq, st) in enumerate(zip(seqs, starts, strict=True)):
            ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            attn[r, : len(seq)] = 1
            row_list += [r] * (len(seq) - st)
            # position p predicts token p + 1; as an offset from the padded end: width - p
            col_list += range(width - (st - 1), width - (len(seq) - 1), -1)
        rows = torch.tensor(row_list, device=self.device)
        cols = torch.tensor(col_list, device=self.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": attn.to(self.device),
            "use_cache": False,
        }
        ctx = (
            contextlib.nullcontext()
            if adapter or self.adapter_dir is None
            else self.model.disable_adapter()
        )
        with ctx, self._head_at(rows, cols) as fired:
            logits: torch.Tensor = self.model(**kwargs).logits
        if fired[0]:
            return logits[0]
        # A model whose head bypasses its output-embedding module: gather from full logits.
        return logits[rows, logits.shape[1] - cols]

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[int],
        mode: Mode = "svd-precomputed",
        *,
        mu: float | None = None,
        alpha: float | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        shift: torch.Tensor | None = None,
    ) -> GenerationResult:
        """Decode one prompt with the given mode (string prompts are tokenised like vLLM does).

        ``shift`` overrides the loaded vector's shift (then ``mu`` must be given).
        """
        mu_v, alpha_v = self._resolve(mode, mu, alpha, has_shift=shift is not None)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        need_adapter, need_base = self._needs(mode)
        if mode == "base" or self.adapter_dir is None:
            need_adapter = False
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = self.tokenizer.eos_token_id
        shift = shift.to(self.device) if shift is not None else self._shift()
        use_cache = not self.is_prompt_learning
        cache_a: Any = None
        cache_b: Any = None
        pending = torch.tensor(ids, dtype=torch.long)
        full = list(ids)
        out: list[int] = []
        finished_by = "length"
        for _ in range(max_new_tokens):
            feed = pending if use_cache else torch.tensor(full, dtype=torch.long)
            z_a: torch.Tensor | None = None
            z_b: torch.Tensor | None = None
            if need_adapter:
                la, cache_a = self._forward(
                    feed, adapter=True, cache=cache_a if use_cache else None
                )
                z_a = la[-1]
            if need_base:
                lb, cache_b = self._forward(
                    feed, adapter=False, cache=cache_b if use_cache else None
                )
                z_b = lb[-1]
            if mode == "base":
                assert z_b is not None
                z = z_b
            else:
                assert z_a is not None  # every mode but "base" needs the adapter's logits
                z = svd_logits(mode, z_a, z_base=z_b, shift=shift, mu=mu_v, alpha=alpha_v)
            nxt = sample_next(z, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            out.append(nxt)
            full.append(nxt)
            pending = torch.tensor([nxt], dtype=torch.long)
            if stop_at_eos and eos is not None and nxt == eos:
                finished_by = "eos"
                break
        return GenerationResult(
            token_ids=out,
            text=str(self.tokenizer.decode(out, skip_special_tokens=True)),
            mode=mode,
            mu=None if mode in ("base", "adapter") else mu_v,
            alpha=None if mode in ("base", "adapter") else alpha_v,
            finished_by=finished_by,
        )

    # -- scoring -------------------------------------------------------------------------
    def continuation_ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt ids (with special tokens) and continuation ids (without)."""
        ctx = self.encode(prompt)
        cont = list(self.tokenizer(continuation, add_special_tokens=False).input_ids)
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenises to nothing")
        return ctx, cont

    @torch.no_grad()
    def score(
        self,
        prompt: str,
        continuations: Sequence[str],
        mode: Mode = "svd-precomputed",
        *,
        mu: float | None = None,
        alpha: float | None = None,
        scoring: str = "soft",
    ) -> list[OptionScore]:
        """Teacher-forced log-likelihood of each continuation under a mode.

        ``scoring="soft"`` uses ``log_softmax(z + mu*I*dz)`` (the project's default for
        multiple choice); ``"filtered"`` also sets tokens outside the mask to ``-inf``.
        """
        if scoring not in ("soft", "filtered"):
            raise ValueError(f"scoring must be 'soft' or 'filtered', got {scoring!r}")
        mu_v, alpha_v = self._resolve(mode, mu, alpha)
        shift = self._shift()
        results = []
        for cont_text in continuations:
            ctx, cont = self.continuation_ids(prompt, cont_text)
            z_a, z_b = self.logits(ctx + cont)
            sl = slice(len(ctx) - 1, len(ctx) + len(cont) - 1)
            labels = torch.tensor(cont, dtype=torch.long, device=z_b.device)
            za = z_a[sl] if z_a is not None else None
            zb = z_b[sl]
            if mode == "base":
                z = zb
            else:
                if za is None:
                    raise ValueError(f"mode {mode!r} needs an adapter")
                z = svd_logits(
                    mode,
                    za,
                    z_base=zb,
                    shift=shift,
                    mu=mu_v,
                    alpha=alpha_v,
                    filtered=scoring == "filtered",
                )
            lp = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            results.append(OptionScore(float(lp.sum()), len(cont), [float(x) for x in lp]))
        return results
