"""The steered-variant rule (``svd_vllm.registry.variants``) that vLLM's plugin and the sidecar
both apply: which names are variants, what steering they stand for, and what they refuse."""

from __future__ import annotations

import pytest

from svd_vllm.registry import Manifest, PresetEntry
from svd_vllm.registry.variants import Variant, VariantError, listed, parse, steering_xargs

MANIFEST = Manifest(
    presets={
        "strong": PresetEntry(name="strong", scale=2.0, alpha=0.2),
        "back": PresetEntry(name="back", scale=-0.5),
    }
)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("lora:svd", Variant("lora:svd", "lora", None)),
        ("lora:svd-strong", Variant("lora:svd-strong", "lora", "strong")),
        ("org/m:v2:svd", Variant("org/m:v2:svd", "org/m:v2", None)),  # the last suffix counts
        ("lora", None),
        (":svd", None),  # no model
        ("lora:svd-", None),  # no preset
        ("lora:svdx", None),
        ("lora:svd:other", None),
        (None, None),
        (3, None),
    ],
)
def test_which_names_are_variants(name: object, want: Variant | None) -> None:
    assert parse(name) == want


def test_a_variant_adds_its_presets_steering_to_the_requests_own_xargs() -> None:
    variant = parse("lora:svd-strong")
    assert variant is not None
    got = steering_xargs(variant, MANIFEST, {"top_k_custom": 3})
    assert got == {"top_k_custom": 3, "svd": 1, "svd_scale": 2.0, "svd_alpha": 0.2}
    plain = parse("lora:svd")
    assert plain is not None and steering_xargs(plain, MANIFEST, None) == {"svd": 1}


@pytest.mark.parametrize(
    ("name", "xargs", "field", "code", "words"),
    [
        ("lora:svd-nosuch", None, None, "model_not_found", "no steering preset named 'nosuch'"),
        ("lora:svd", {"svd": 0}, None, "steering_conflict", "vllm_xargs.svd:"),
        ("lora:svd", {"svd_scale": 2}, None, "steering_conflict", "vllm_xargs.svd_scale:"),
        ("lora:svd", None, "steering", "steering_conflict", "steering: the model `lora:svd`"),
    ],
)
def test_refusals_name_the_problem_and_carry_an_http_status(
    name: str, xargs: dict | None, field: str | None, code: str, words: str
) -> None:
    variant = parse(name)
    assert variant is not None
    with pytest.raises(VariantError) as e:
        steering_xargs(variant, MANIFEST, xargs, conflicting_field=field)
    assert e.value.code == code and words in str(e.value)
    assert e.value.status == (400 if code == "steering_conflict" else 404)


def test_listing_puts_the_plain_variant_first_then_presets_by_name() -> None:
    names = [n for n, _ in listed("lora", MANIFEST)]
    assert names == ["lora:svd", "lora:svd-back", "lora:svd-strong"]
    info = dict(listed("lora", MANIFEST))["lora:svd-back"]
    assert info == {
        "variant_of": "lora",
        "preset": "back",
        "vllm_xargs": {"svd": 1, "svd_scale": -0.5},
    }
