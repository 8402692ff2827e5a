"""The tiny model the upstream reproductions share (imported by ``repro_vllm_cpu_*.py``; keep it
next to them when filing a report): a random 2-layer Llama with a word-level tokenizer, and a
random LoRA. Needs transformers, tokenizers, peft and torch; downloads nothing."""

from __future__ import annotations

from pathlib import Path


def build(root: Path, *, peaked: bool = False) -> tuple[Path, Path]:
    """Write ``root/base`` and ``root/lora``; ``peaked`` sharpens the output distribution and
    the LoRA (greedy outputs of base and LoRA rows then differ visibly)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(509))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "base")
    model = LlamaForCausalLM(cfg)
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    model.save_pretrained(root / "base")
    lora = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
        ),
    )
    if peaked:
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
    lora.save_pretrained(root / "lora")
    return root / "base", root / "lora"
