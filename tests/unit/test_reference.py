"""The reference decoder on the tiny model with a non-zero LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.core.steering import log_ratio
from svd_vllm.offline.reference import ReferenceDecoder, sample_next
from svd_vllm.tools.cli import main as cli_main

PROMPTS = ["the color of sky is", "what is the color of snow ? answer :", "one two three"]


@pytest.fixture(scope="module")
def decoder(tiny_dirs: tuple[Path, Path]) -> ReferenceDecoder:
    base, lora = tiny_dirs
    return ReferenceDecoder(base, lora)


def vector_from_context(dec: ReferenceDecoder, prompt: str, mu: float = -2.0) -> SteeringArtifact:
    z_a, z_b = dec.logits(dec.encode(prompt))
    r = log_ratio(z_a[-1], z_b[-1])
    return SteeringArtifact.create(
        r,
        name="ctx",
        base_model="tiny",
        adapter="tiny-lora",
        tokenizer_fingerprint="t",
        mu_bar=mu,
        mu_bar_exact=mu,
        alpha=0.05,
    )


def test_the_lora_is_not_a_no_op(decoder: ReferenceDecoder) -> None:
    z_a, z_b = decoder.logits(decoder.encode(PROMPTS[0]))
    assert (z_a - z_b).abs().max() > 0.1
    outs = {
        decoder.generate(p, "base", max_new_tokens=6).text
        != decoder.generate(p, "adapter", max_new_tokens=6).text
        for p in PROMPTS
    }
    assert True in outs


def test_base_mode_is_the_plain_model(
    tiny_dirs: tuple[Path, Path], decoder: ReferenceDecoder
) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs[0], dtype=torch.float32).eval()
    ids = decoder.encode(PROMPTS[1])
    with torch.no_grad():
        ref = plain(input_ids=torch.tensor([ids])).logits[0].float()
    _, z_b = decoder.logits(ids)
    torch.testing.assert_close(z_b, ref)


def test_svd_exact_with_mu_zero_equals_adapter(decoder: ReferenceDecoder) -> None:
    for p in PROMPTS:
        a = decoder.generate(p, "adapter", max_new_tokens=12)
        s = decoder.generate(p, "svd-exact", mu=0.0, alpha=0.1, max_new_tokens=12)
        assert s.token_ids == a.token_ids
    opts = ["blue", "red green", "yes"]
    a_scores = decoder.score(PROMPTS[0], opts, "adapter")
    s_scores = decoder.score(PROMPTS[0], opts, "svd-exact", mu=0.0, scoring="soft")
    assert [x.logprob for x in s_scores] == [x.logprob for x in a_scores]


def test_steering_changes_the_reference_outputs(decoder: ReferenceDecoder) -> None:
    changed = 0
    for p in PROMPTS:
        a = decoder.generate(p, "adapter", max_new_tokens=12)
        s = decoder.generate(p, "svd-exact", mu=-50.0, alpha=0.01, max_new_tokens=12)
        changed += s.token_ids != a.token_ids
    assert changed >= 1


def test_precomputed_with_exact_ratio_reproduces_exact_at_that_context(
    decoder: ReferenceDecoder,
) -> None:
    prompt = PROMPTS[0]
    vec = vector_from_context(decoder, prompt, mu=-20.0)
    decoder.set_vector(vec)
    try:
        opts = ["blue", "red", "w7", "the"]
        exact = decoder.score(prompt, opts, "svd-exact", mu=-20.0, alpha=0.05)
        pre = decoder.score(prompt, opts, "svd-precomputed")  # mu and alpha from the artifact
        for e, q in zip(exact, pre, strict=True):
            assert q.logprob == pytest.approx(e.logprob, abs=1e-5)
        g_exact = decoder.generate(prompt, "svd-exact", mu=-20.0, alpha=0.05, max_new_tokens=1)
        g_pre = decoder.generate(prompt, "svd-precomputed", max_new_tokens=1)
        assert g_pre.token_ids == g_exact.token_ids
        # The steering did something at that context (the test could fail).
        plain = decoder.score(prompt, opts, "adapter")
        assert any(abs(p.logprob - e.logprob) > 1e-3 for p, e in zip(plain, exact, strict=True))
    finally:
        decoder.set_vector(None)


def test_kv_cache_generation_equals_full_recompute(decoder: ReferenceDecoder) -> None:
    """Greedy decoding with caches equals re-running the whole sequence every step."""
    prompt = PROMPTS[1]
    fast = decoder.generate(
        prompt, "svd-exact", mu=-5.0, alpha=0.1, max_new_tokens=8, stop_at_eos=False
    )
    ids = decoder.encode(prompt)
    from svd_vllm.core.steering import svd_logits

    slow = []
    for _ in range(8):
        z_a, z_b = decoder.logits(ids)
        z = svd_logits("svd-exact", z_a[-1], z_base=z_b[-1], mu=-5.0, alpha=0.1)
        nxt = int(z.argmax())
        slow.append(nxt)
        ids.append(nxt)
    assert fast.token_ids == slow


def test_sampling_with_a_seed_is_reproducible(decoder: ReferenceDecoder) -> None:
    kw = dict(mu=-3.0, alpha=0.05, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50)
    a = decoder.generate(PROMPTS[0], "svd-exact", seed=7, **kw)
    b = decoder.generate(PROMPTS[0], "svd-exact", seed=7, **kw)
    assert a.token_ids == b.token_ids  # same seed, same draw
    draws = {
        tuple(decoder.generate(PROMPTS[0], "svd-exact", seed=s, **kw).token_ids) for s in range(8)
    }
    assert len(draws) > 1  # the seed is used
    greedy = decoder.generate(PROMPTS[0], "svd-exact", seed=7, **{**kw, "temperature": 0.0})
    assert draws != {tuple(greedy.token_ids)}  # the temperature is used: sampling is not greedy


def test_sample_next_respects_top_k_and_top_p() -> None:
    z = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(z, temperature=1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws <= {0, 1}
    draws = {sample_next(z, temperature=1.0, top_p=0.5, generator=g) for _ in range(200)}
    assert draws == {0}
    assert sample_next(z) == 0


def test_bad_requests_are_refused(decoder: ReferenceDecoder, tiny_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="needs a steering vector"):
        decoder.generate(PROMPTS[0], "svd-precomputed")
    with pytest.raises(ValueError, match="needs mu"):
        decoder.generate(PROMPTS[0], "svd-exact")
    with pytest.raises(ValueError, match="alpha"):
        decoder.generate(PROMPTS[0], "svd-exact", mu=-1.0, alpha=0.0)
    with pytest.raises(ValueError, match="unknown mode"):
        decoder.generate(PROMPTS[0], "magic")  # type: ignore[arg-type]
    wrong = SteeringArtifact.create(
        torch.zeros(10),
        name="w",
        base_model="b",
        adapter="a",
        tokenizer_fingerprint="t",
        mu_bar=-1.0,
    )
    with pytest.raises(ValueError, match="vocab_size 10 but the model has 256"):
        decoder.set_vector(wrong)
    with pytest.raises(ValueError, match="scoring"):
        decoder.score(PROMPTS[0], ["blue"], "adapter", scoring="hard")


def test_prompt_tuning_adapters_work_in_the_reference_decoder(
    tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Prompt-learning PEFT works in the reference decoder (base = backbone without virtual tokens)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[0], dtype=torch.float32)
    model = get_peft_model(
        base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "prompt_encoder" in n:
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "pt")
    dec = ReferenceDecoder(tiny_dirs[0], tmp_path / "pt")
    assert dec.is_prompt_learning
    z_a, z_b = dec.logits(dec.encode(PROMPTS[0]))
    assert z_a.shape == z_b.shape and (z_a - z_b).abs().max() > 1e-3
    a = dec.generate(PROMPTS[0], "adapter", max_new_tokens=5)
    s = dec.generate(PROMPTS[0], "svd-exact", mu=0.0, max_new_tokens=5)
    assert a.token_ids == s.token_ids
    plain = ReferenceDecoder(tiny_dirs[0])
    assert (
        dec.generate(PROMPTS[0], "base", max_new_tokens=5).token_ids
        == plain.generate(PROMPTS[0], "base", max_new_tokens=5).token_ids
    )


def test_cli_generate_and_vector_show_match_the_library(
    tiny_dirs: tuple[Path, Path],
    decoder: ReferenceDecoder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, lora = tiny_dirs
    vec_path = artifact.save(vector_from_context(decoder, PROMPTS[0]), tmp_path / "v.safetensors")
    generate = ["generate", "--base", str(base), "--adapter", str(lora)]
    steered = ["--vector", str(vec_path), "--mode", "all", "--prompt", PROMPTS[0]]
    rc = cli_main([*generate, *steered, "--max-tokens", "4", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["base", "adapter", "svd-exact", "svd-precomputed"]
    expected = ReferenceDecoder(base, lora, vector=artifact.load(vec_path)).generate(
        PROMPTS[0], "svd-precomputed", max_new_tokens=4
    )
    assert rows[3]["token_ids"] == expected.token_ids
    assert rows[2]["mu"] == pytest.approx(-2.0) and rows[2]["alpha"] == pytest.approx(0.05)
    assert cli_main(["vector", "show", str(vec_path)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "ctx"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert cli_main(["vector", "show", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    rc = cli_main([*generate, "--mode", "svd-precomputed", "--prompt", "x"])
    assert rc == 2
    assert "needs a steering vector" in capsys.readouterr().err
