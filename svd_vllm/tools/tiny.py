"""A tiny Llama model, word-level tokenizer and LoRA that vLLM's CPU backend also loads.

Tests and the offline demo build these themselves (nothing is downloaded). vLLM's CPU attention
needs head_dim in {32, 64, 80, ...}: hidden 64 with 2 heads gives head_dim 32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch

__all__ = ["TINY_WORDS", "build_tiny_lora", "build_tiny_model", "build_tiny_tokenizer"]

#: The tokenizer's real words; the rest of the vocabulary is filled with ``w<i>`` tokens.
TINY_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "is",
    "of",
    "and",
    "to",
    "in",
    "color",
    "sky",
    "grass",
    "sun",
    "snow",
    "sea",
    "leaf",
    "fire",
    "night",
    "blood",
    "cloud",
    "blue",
    "green",
    "yellow",
    "white",
    "red",
    "black",
    "gray",
    "orange",
    "purple",
    "pink",
    "what",
    "answer",
    "question",
    ":",
    ".",
    "?",
    ",",
    "yes",
    "no",
    "true",
    "false",
    "one",
    "two",
    "three",
    "four",
    "five",
)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 256) -> Any:
    """A whitespace word-level tokenizer of exactly ``vocab_size`` entries, saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + list(TINY_WORDS)
    if vocab_size < len(words):
        raise ValueError(f"vocab_size must be at least {len(words)}")
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a randomly initialised tiny Llama (and its tokenizer) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    build_tiny_tokenizer(out, vocab_size=vocab_size)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden_size // 2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger output weights than the default init give peaked, informative distributions.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    cast(Any, model).to(dtype).save_pretrained(out)
    return out


def build_tiny_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 1,
    rank: int = 8,
    scale: float = 0.5,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """Save a LoRA adapter for ``base_dir`` with random non-zero ``lora_B``.

    A LoRA saved straight after ``get_peft_model`` is a no-op (B = 0), so B is randomised.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(target_modules)
    )
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    # Record where it came from, for humans.
    (out / "svd_vllm_origin.json").write_text(
        json.dumps({"kind": "tiny-random-lora", "seed": seed})
    )
    return out
