"""The PEFT warm start: one short epoch of LoRA / IA3 / prompt tuning / P-tuning on a task.

Paper defaults (its Table 7): lr 5e-5, 1 epoch, max length 512; LoRA r=8, alpha=16,
dropout 0.1 on q_proj,v_proj (q,k,v,o for Llama/Qwen); IA3 on q,k,v,o,up,down; 20 virtual
tokens for prompt tuning; P-tuning with a 2-layer, 128-wide prompt encoder (PEFT's
``PromptEncoderConfig``). The loss is on completion tokens only. Batches are padded on the
right; the order is shuffled by ``seed``; AdamW with linear decay; bf16 autocast on CPUs that
have native bf16 (``precision.use_cpu_bf16``), float32 elsewhere.
The paper's batch size is 1; CPU throughput wants more, so ``batch_size`` defaults to 8.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .precision import use_cpu_bf16

__all__ = ["METHODS", "WarmStartConfig", "WarmStartResult", "peft_config", "train_adapter"]

METHODS = ("lora", "ia3", "prompt", "ptuning")


@dataclass
class WarmStartConfig:
    method: str = "lora"
    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None  # None: paper's choice for the architecture
    virtual_tokens: int = 20
    max_examples: int | None = None
    bf16: bool | None = None  # None: bf16 autocast only where the CPU has native bf16
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
            task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, target_modules=targets,
        )  # fmt: skip
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
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.virtual_tokens,
            encoder_hidden_size=128, encoder_num_layers=2,
        )  # fmt: skip
    raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")


def _encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    ctx = list(tokenizer(prompt).input_ids)
    cont = list(tokenizer(completion, add_special_tokens=False).input_ids)
    if not cont:
        raise ValueError(f"completion {completion!r} tokenises to nothing")
    cont = cont[: max_length - 1]
    ctx = ctx[-(max_length - len(cont)) :]  # keep the completion, cut the prompt's start
    return ctx + cont, len(ctx)


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


def train_adapter(
    base_dir: str | Path,
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    cfg: WarmStartConfig | None = None,
    *,
    progress: bool = True,
) -> WarmStartResult:
    """Warm-start a PEFT adapter on ``(prompt, completion)`` pairs and save it to ``out_dir``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or WarmStartConfig()
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    if not examples:
        raise ValueError("no training examples")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, peft_config(cfg, model))
    model.train()

    data = [_encode(tok, p, c, cfg.max_length) for p, c in examples]
    order = list(range(len(data)))
    random.Random(cfg.seed).shuffle(order)
    n_use = round(len(order) * cfg.epochs) if cfg.epochs < 1 else len(order) * int(cfg.epochs)
    if cfg.max_examples is not None:
        n_use = min(n_use, cfg.max_examples)
    schedule = [order[i % len(order)] for i in range(n_use)]
    batches = _length_bucketed(schedule, [len(ids) for ids, _ in data], cfg.batch_size, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, len(batches))))
    losses: list[float] = []
    tokens = 0
    t0 = time.time()
    bf16 = use_cpu_bf16(cfg.bf16)
    bar = tqdm(batches, desc=f"warm start ({cfg.method})", unit="batch", disable=not progress)
    for batch in bar:
        seqs = [data[i] for i in batch]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, (ids, n_ctx) in enumerate(seqs):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attn[r, : len(ids)] = 1
            labels[r, n_ctx : len(ids)] = torch.tensor(ids[n_ctx:])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=input_ids, attention_mask=attn, labels=labels)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {len(losses)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int((labels != -100).sum())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    result = WarmStartResult(
        out_dir=str(out), method=cfg.method, examples=n_use, steps=len(batches), tokens=tokens,
        seconds=time.time() - t0, first_loss=losses[0], last_loss=losses[-1],
        mean_loss=sum(losses) / len(losses),
    )  # fmt: skip
    (tmp / "svd_vllm_warmstart.json").write_text(
        json.dumps(
            {"config": asdict(cfg), "result": asdict(result), "base": str(base_dir)}, indent=2
        )
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return result
