"""The PEFT warm start: one short epoch of LoRA / IA3 / prompt tuning / P-tuning on a task.

Paper defaults (its Table 7): lr 5e-5, 1 epoch, max length 512; LoRA r=8, alpha=16,
dropout 0.1 on q_proj,v_proj (q,k,v,o for Llama/Qwen); IA3 on q,k,v,o,up,down; 20 virtual
tokens for prompt tuning; P-tuning with a 2-layer, 128-wide prompt encoder (PEFT's
``PromptEncoderConfig``). The loss is on completion tokens only. Batches are padded on the
right and bucketed by length; the order is shuffled by ``seed``; AdamW with linear decay.
The paper's batch size is 1; throughput wants more, so ``batch_size`` defaults to 8 (use
``grad_accum`` for a larger effective batch).

Precision (``precision.resolve`` picks the dtype for ``device``/``dtype``):
* CUDA: the base weights load onto the GPU in that dtype (bf16 by default); PEFT keeps the
  trainable adapter weights in float32 (its ``autocast_adapter_dtype``), and the forward runs
  under autocast in the weights' dtype (fp16 adds a gradient scaler).
* CPU: float32 weights, with bf16 autocast where the dtype resolves to bf16 (CPUs with native
  bf16), so an AVX2-only CPU trains at float32 speed.

The output directory is written atomically; ``<out>.partial/`` holds a checkpoint every
``checkpoint_every`` optimizer steps, and a run with the same config and data resumes from it
(a different config or data is refused rather than mixed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.choices import PEFT_METHODS
from .precision import Placement, resolve

__all__ = [
    "PEFT_METHODS",
    "RECORD",
    "WarmStartConfig",
    "WarmStartResult",
    "encode_examples",
    "peft_config",
    "train_adapter",
    "train_encoded",
]

#: The warm start's record (config, result, base), written inside the adapter directory.
RECORD = "svd_vllm_warmstart.json"


@dataclass
class WarmStartConfig:
    method: str = "lora"
    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None  # None: paper's choice for the architecture
    virtual_tokens: int = 20
    max_examples: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints (0: never)
    weight_decay: float = 0.0


@dataclass
class WarmStartResult:
    out_dir: str
    method: str
    examples: int
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float
    mean_loss: float
    device: str = ""
    dtype: str = ""
    resumed_from_step: int = 0
    peak_memory_bytes: int | None = None


def _arch(model) -> str:  # type: ignore[no-untyped-def]
    return str(getattr(model.config, "model_type", "")).lower()


def peft_config(cfg: WarmStartConfig, model):  # type: ignore[no-untyped-def]
    """The PEFT config of the paper's settings for ``cfg.method`` on ``model``."""
    from peft import IA3Config, LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    arch = _arch(model)
    if cfg.method == "lora":
        targets = cfg.target_modules or (
            ["q_proj", "k_proj", "v_proj", "o_proj"]
            if arch in ("llama", "qwen2", "qwen3")
            else ["q_proj", "v_proj"]
        )
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
        )
    if cfg.method == "ia3":
        targets = cfg.target_modules or [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "up_proj",
            "down_proj",
        ]
        ff = [t for t in targets if t in ("up_proj", "down_proj", "gate_proj")]
        return IA3Config(
            task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff
        )
    if cfg.method == "prompt":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.virtual_tokens
        )
    if cfg.method == "ptuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.virtual_tokens,
            encoder_hidden_size=128,
            encoder_num_layers=2,
        )
    raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(PEFT_METHODS)}")


def _encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    ctx = list(tokenizer(prompt).input_ids)
    cont = list(tokenizer(completion, add_special_tokens=False).input_ids)
    if not cont:
        raise ValueError(f"completion {completion!r} tokenises to nothing")
    cont = cont[: max_length - 1]
    ctx = ctx[-(max_length - len(cont)) :]  # keep the completion, cut the prompt's start
    return ctx + cont, len(ctx)


def encode_examples(
    tokenizer: Any, examples: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """``(ids, n_prompt)`` per example; over ``max_length`` the prompt's start is cut (the
    completion is kept), as the paper's max length does."""
    if max_length < 2:
        raise ValueError(f"max length must be at least 2, got {max_length}")
    return [_encode(tokenizer, p, c, max_length) for p, c in examples]


def _length_bucketed(
    schedule: list[int], lengths: list[int], batch_size: int, seed: int
) -> list[list[int]]:
    """Batches of similar length (less padding), in shuffled order; each example once."""
    rng = random.Random(seed + 1)
    window = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(schedule), window):
        chunk = sorted(schedule[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _fingerprint(cfg: WarmStartConfig, data: Sequence[tuple[list[int], int]]) -> str:
    """What a checkpoint must match to be resumed: the config (but not how often it checkpoints)
    and the exact training data."""
    h = hashlib.sha256()
    fields = asdict(cfg)
    fields.pop("checkpoint_every")
    h.update(json.dumps(fields, sort_keys=True).encode())
    for ids, n_ctx in data:
        h.update(json.dumps([n_ctx, ids]).encode())
    return h.hexdigest()


class _Checkpoint:
    """``<out>.partial/``: adapter weights, optimizer and scheduler state, step, RNG states."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.dir = out.with_name(out.name + ".partial")
        self.fingerprint = fingerprint

    def load(self, model: Any, opt: Any, sched: Any) -> dict[str, Any] | None:
        state_file = self.dir / "trainer.pt"
        if not state_file.exists():
            return None
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.dir} holds a checkpoint of a different warm start (config or data "
                "differ); delete it to start over, or rerun with the same settings to resume"
            )
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return dict(state["progress"])

    def save(self, model: Any, opt: Any, sched: Any, progress: dict[str, Any]) -> None:
        from peft import get_peft_model_state_dict

        self.dir.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self.fingerprint,
            "adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "progress": progress,
        }
        tmp = self.dir / "trainer.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.dir / "trainer.pt")  # atomic: a kill leaves the previous checkpoint

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _load_base(base_dir: str | Path, place: Placement) -> Any:
    from transformers import AutoModelForCausalLM

    if place.device.type == "cuda":
        return AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=place.dtype, device_map={"": str(place.device)}
        )
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def train_adapter(
    base_dir: str | Path,
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    cfg: WarmStartConfig | None = None,
    *,
    progress: bool = True,
) -> WarmStartResult:
    """Warm-start a PEFT adapter on ``(prompt, completion)`` pairs and save it to ``out_dir``."""
    from transformers import AutoTokenizer

    cfg = cfg or WarmStartConfig()
    _check(cfg)
    if not examples:
        raise ValueError("no training examples")
    tok = AutoTokenizer.from_pretrained(base_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    data = encode_examples(tok, examples, cfg.max_length)
    place = resolve(cfg.device, cfg.dtype)
    model = _load_base(base_dir, place)
    return train_encoded(
        model, data, out_dir, cfg, pad_id=int(pad), base=str(base_dir), progress=progress
    )


def _check(cfg: WarmStartConfig) -> None:
    if cfg.method not in PEFT_METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(PEFT_METHODS)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise ValueError(
                f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}"
            )


def _schedule(
    data: Sequence[tuple[list[int], int]], cfg: WarmStartConfig
) -> tuple[list[list[int]], int, int]:
    """(batches of example indices, examples used, optimizer steps): ``cfg.epochs`` passes over a
    seeded shuffle (a fraction of one pass below 1), capped at ``cfg.max_examples``, in
    length-bucketed batches."""
    order = list(range(len(data)))
    random.Random(cfg.seed).shuffle(order)
    n_use = round(len(order) * cfg.epochs) if cfg.epochs < 1 else len(order) * int(cfg.epochs)
    if cfg.max_examples is not None:
        n_use = min(n_use, cfg.max_examples)
    schedule = [order[i % len(order)] for i in range(n_use)]
    batches = _length_bucketed(schedule, [len(ids) for ids, _ in data], cfg.batch_size, cfg.seed)
    return batches, n_use, math.ceil(len(batches) / cfg.grad_accum)


def _collate(
    seqs: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of right-padded examples; only completion tokens
    (``ids[n_ctx:]``) are labelled."""
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (ids, n_ctx) in enumerate(seqs):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attn[r, : len(ids)] = 1
        labels[r, n_ctx : len(ids)] = torch.tensor(ids[n_ctx:])
    return input_ids, attn, labels


def _save_adapter(
    model: Any, out: Path, cfg: WarmStartConfig, result: WarmStartResult, base: str
) -> None:
    """Write the adapter and its record to ``out`` atomically (a ``.tmp`` sibling, renamed)."""
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / RECORD).write_text(
        json.dumps({"config": asdict(cfg), "result": asdict(result), "base": base}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _backward(
    model: Any,
    examples: list[tuple[list[int], int]],
    pad_id: int,
    place: Placement,
    scaler: torch.amp.GradScaler,
    cfg: WarmStartConfig,
) -> tuple[float | None, int]:
    """One batch's forward and backward pass (its loss scaled for gradient accumulation, in
    ``place``'s autocast dtype). Returns (the loss, or None when it is not finite and nothing
    was back-propagated; the number of trained tokens)."""
    device = next(model.parameters()).device
    input_ids, attn, labels = _collate(examples, pad_id)
    autocast: Any = (
        torch.autocast(device.type, dtype=place.dtype)
        if place.dtype != torch.float32
        else contextlib.nullcontext()
    )
    with autocast:
        loss = model(
            input_ids=input_ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)
        ).loss
    if not torch.isfinite(loss):
        return None, 0
    scaler.scale(loss / cfg.grad_accum).backward()
    return float(loss.detach()), int((labels != -100).sum())


def _with_adapter(model: Any, cfg: WarmStartConfig) -> Any:
    """``model`` with a fresh trainable PEFT adapter (its weights in float32), in training mode."""
    from peft import get_peft_model

    model.config.use_cache = False
    model = get_peft_model(model, peft_config(cfg, model))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _optimizer_step(
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """One optimizer step on the accumulated gradients, clipped to norm 1."""
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)


def train_encoded(
    model: Any,
    data: Sequence[tuple[list[int], int]],
    out_dir: str | Path,
    cfg: WarmStartConfig,
    *,
    pad_id: int = 0,
    base: str = "<in-memory>",
    progress: bool = True,
) -> WarmStartResult:
    """The training loop on a loaded base ``model`` (on its device) and tokenised ``data``.

    The adapter is injected into ``model`` for the run and removed again at the end, so a caller
    can train several adapters on one loaded base.
    """
    _check(cfg)
    if not data:
        raise ValueError("no training examples")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    place = resolve(device, cfg.dtype)
    model = _with_adapter(model, cfg)

    batches, n_use, n_steps = _schedule(data, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, n_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=place.dtype == torch.float16)
    out = Path(out_dir)
    ckpt = _Checkpoint(out, _fingerprint(cfg, data))
    state = ckpt.load(model, opt, sched) or {"batch": 0, "losses": [], "tokens": 0, "seconds": 0.0}
    resumed = int(state["batch"]) // cfg.grad_accum
    losses: list[float] = list(state["losses"])
    tokens = int(state["tokens"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time() - float(state["seconds"])
    desc, start = f"warm start ({cfg.method})", int(state["batch"])
    bar = tqdm(total=len(batches), initial=start, desc=desc, unit="batch", disable=not progress)
    for b in range(start, len(batches)):
        loss, n_tokens = _backward(model, [data[i] for i in batches[b]], pad_id, place, scaler, cfg)
        if loss is None:
            raise FloatingPointError(f"non-finite training loss at batch {b}")
        losses.append(loss)
        tokens += n_tokens
        if (b + 1) % cfg.grad_accum == 0 or b + 1 == len(batches):
            _optimizer_step(params, opt, sched, scaler)
            step = (b + 1 + cfg.grad_accum - 1) // cfg.grad_accum
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                done = {"batch": b + 1, "losses": losses, "tokens": tokens}
                ckpt.save(model, opt, sched, done | {"seconds": time.time() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = WarmStartResult(
        out_dir=str(out),
        method=cfg.method,
        examples=n_use,
        steps=n_steps,
        tokens=tokens,
        seconds=time.time() - t0,
        first_loss=losses[0],
        last_loss=losses[-1],
        mean_loss=sum(losses) / len(losses),
        device=str(device),
        dtype=str(place.dtype).removeprefix("torch."),
        resumed_from_step=resumed,
        peak_memory_bytes=peak,
    )
    _save_adapter(model, out, cfg, result, base)
    ckpt.remove()
    if hasattr(model, "unload"):  # hand the caller's base model back without adapter layers
        model.unload()
    return result
