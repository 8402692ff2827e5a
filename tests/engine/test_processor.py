"""The logits processor without an engine: V1 batch updates and V2 slots, against the math."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

from svd_vllm.core.artifact import SteeringArtifact
from svd_vllm.core.steering import confidence_mask, precomputed_delta, steer
from svd_vllm.registry import Registry
from svd_vllm.registry.request import LORA_KEY, PIN_KEY, parse_request_args
from svd_vllm.vllm.admission import set_served_vocab_size, set_stamping, validate_steering_params
from svd_vllm.vllm.processor import SVDLogitsProcessor
from tests.support.artifacts import random_vector

V = 64


def vec(name: str, seed: int, mu: float, alpha: float = 0.1, vocab: int = V) -> SteeringArtifact:
    """This file's vectors: spread 3, so steering visibly moves a V-wide row."""
    return random_vector(name, vocab=vocab, seed=seed, mu=mu, alpha=alpha, spread=3.0)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("SVD_VLLM_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.delenv("SVD_VLLM_DEFAULT", raising=False)
    set_stamping(True)  # as in a server, where the plugin stamps; the conftest resets it
    reg = Registry()
    reg.add(vec("a", 1, -4.0))
    reg.add(vec("b", 2, -9.0, alpha=0.3))
    return reg


def config(max_seqs: int = 8) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(get_vocab_size=lambda: V),
        scheduler_config=SimpleNamespace(max_num_seqs=max_seqs),
        parallel_config=SimpleNamespace(rank=0, tensor_parallel_size=1, pipeline_parallel_size=1),
    )


def sp(**extra) -> SamplingParams:
    return SamplingParams(temperature=0, extra_args=extra or None)


def expected(z: torch.Tensor, art: SteeringArtifact, mu: float, alpha: float) -> torch.Tensor:
    return steer(z, precomputed_delta(z, art.shift), mu, confidence_mask(z, alpha))


def logits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 2


def test_the_entry_point_class_loads_and_builds_on_both_runners(registry: Registry) -> None:
    from vllm.v1.sample.logits_processor import _load_custom_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs

    # vLLM's own loaders: the installed entry point and the same class by name.
    fqcn = "svd_vllm.vllm.processor:SVDLogitsProcessor"
    assert _load_custom_logitsprocs([fqcn]) == [SVDLogitsProcessor, SVDLogitsProcessor]
    assert _load_v2_logitsprocs([fqcn]) == [SVDLogitsProcessor, SVDLogitsProcessor]
    # Each runner's constructor call gives that runner's adapter, which steers.
    v1 = SVDLogitsProcessor(config(), "cpu", False)
    v2 = SVDLogitsProcessor(config(), SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8))
    assert isinstance(v1, V1) and not isinstance(v1, V2) and v1.runner == "v1"
    assert isinstance(v2, V2) and not isinstance(v2, V1) and v2.runner == "v2"
    with pytest.raises(TypeError, match="expected"):
        SVDLogitsProcessor(config())


def test_v1_mixed_batch_moves_and_removals(registry: Registry) -> None:
    p = SVDLogitsProcessor(config(), "cpu", False)
    assert p.is_argmax_invariant() is False
    added = [
        (0, sp(svd=1, svd_vector="a"), None, []),
        (1, sp(), None, []),  # unsteered
        (2, sp(svd=1, svd_vector="b", svd_scale=0.5), None, []),
        (3, sp(svd=1, svd_vector="a", svd_alpha=1.0), None, []),
        (4, sp(**{"svd": 1, LORA_KEY: "b"}), None, []),  # vector from the LoRA name
        (5, sp(**{"svd": 0, LORA_KEY: "a"}), None, []),  # explicit off wins
    ]
    p.update_state(BatchUpdate(batch_size=6, removed=[], added=added, moved=[]))
    z = logits(6)
    z[0, :5] = -math.inf  # another processor removed tokens
    z[1, 7] = -math.inf
    out = p.apply(z.clone())
    a, b = registry.load("a"), registry.load("b")
    torch.testing.assert_close(out[0], expected(z[0:1], a, -4.0, 0.1)[0])
    assert torch.equal(out[1], z[1]) and torch.equal(out[5], z[5])
    torch.testing.assert_close(out[2], expected(z[2:3], b, -4.5, 0.3)[0])
    torch.testing.assert_close(out[3], expected(z[3:4], a, -4.0, 1.0)[0])
    torch.testing.assert_close(out[4], expected(z[4:5], b, -9.0, 0.3)[0])
    assert torch.isneginf(out[0, :5]).all()

    # Swap 0 <-> 1, move 4 -> 5 (5 finished), remove 3.
    p.update_state(
        BatchUpdate(
            batch_size=4,
            removed=[3, 5],
            added=[],
            moved=[(0, 1, MoveDirectionality.SWAP), (4, 3, MoveDirectionality.UNIDIRECTIONAL)],
        )
    )
    z2 = logits(4, seed=1)
    out2 = p.apply(z2.clone())
    assert torch.equal(out2[0], z2[0])  # the unsteered request now sits in row 0
    torch.testing.assert_close(out2[1], expected(z2[1:2], a, -4.0, 0.1)[0])
    torch.testing.assert_close(out2[2], expected(z2[2:3], b, -4.5, 0.3)[0])
    torch.testing.assert_close(out2[3], expected(z2[3:4], b, -9.0, 0.3)[0])
    # Everything finishes: apply is a no-op and all table slots are released.
    p.update_state(BatchUpdate(batch_size=0, removed=[0, 1, 2, 3], added=[], moved=[]))
    z3 = logits(2)
    assert p.apply(z3) is z3 and p.steering.slots.count == 0 and p.store.rows_in_use() == 0


def test_v1_all_rows_steered_in_place_and_bf16(registry: Registry) -> None:
    p = SVDLogitsProcessor(config(), "cpu", False)
    p.update_state(
        BatchUpdate(
            batch_size=2,
            removed=[],
            added=[(i, sp(svd=1, svd_vector="a"), None, []) for i in range(2)],
            moved=[],
        )
    )
    z = logits(2)
    out = p.apply(z.clone())
    torch.testing.assert_close(out, expected(z, registry.load("a"), -4.0, 0.1))
    zb = z.to(torch.bfloat16)
    outb = p.apply(zb.clone())
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(
        outb.float(), expected(zb.float(), registry.load("a"), -4.0, 0.1).to(torch.bfloat16).float()
    )


def test_server_default_on_steers_unless_turned_off(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SVD_VLLM_DEFAULT", "on")
    p = SVDLogitsProcessor(config(), "cpu", False)
    added = [
        (0, sp(**{LORA_KEY: "a"}), None, []),  # steered by default
        (1, sp(**{LORA_KEY: "a", "svd": 0}), None, []),  # explicit off
        (2, sp(**{LORA_KEY: "unknown-adapter"}), None, []),  # no vector: unsteered, no error
        (3, sp(), None, []),  # base model
    ]
    p.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    z = logits(4)
    out = p.apply(z.clone())
    torch.testing.assert_close(out[0], expected(z[0:1], registry.load("a"), -4.0, 0.1)[0])
    for i in (1, 2, 3):
        assert torch.equal(out[i], z[i])


def test_registry_settings_apply_and_versions_are_pinned(registry: Registry) -> None:
    p = SVDLogitsProcessor(config(), "cpu", False)
    params = sp(svd=1, svd_vector="a")
    p.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, None, [])], moved=[]))
    assert params.extra_args[PIN_KEY] == registry.get("a").key and registry.get("a").version == 1
    old = registry.load("a")
    registry.add(vec("a", 99, -1.0), replace=True)
    registry.update("a", default_scale=2.0)
    p.store.refresh()
    z = logits(1)
    # The running request keeps version 1.
    torch.testing.assert_close(p.apply(z.clone()), expected(z, old, -4.0, 0.1))
    # Preempted and re-added: still the pinned version.
    p.update_state(BatchUpdate(batch_size=1, removed=[0], added=[(0, params, None, [])], moved=[]))
    torch.testing.assert_close(p.apply(z.clone()), expected(z, old, -4.0, 0.1))
    # A new request gets version 3 with the default scale 2.
    p.update_state(
        BatchUpdate(
            batch_size=2, removed=[], added=[(1, sp(svd=1, svd_vector="a"), None, [])], moved=[]
        )
    )
    z2 = logits(2)
    out = p.apply(z2.clone())
    torch.testing.assert_close(out[1], expected(z2[1:2], registry.load("a"), -2.0, 0.1)[0])
    # Disabled vectors steer no new request.
    registry.update("a", enabled=False)
    p.store.refresh()
    p.update_state(
        BatchUpdate(
            batch_size=2, removed=[], added=[(1, sp(svd=1, svd_vector="a"), None, [])], moved=[]
        )
    )
    z3 = logits(2)
    assert torch.equal(p.apply(z3.clone())[1], z3[1])


def fake_ctx(idx_mapping: list[int]) -> LogitsContext:
    m = torch.tensor(idx_mapping, dtype=torch.int32)
    n = len(idx_mapping)
    return LogitsContext(
        expanded_idx_mapping=m,
        idx_mapping=m,
        idx_mapping_np=np.array(idx_mapping, dtype=np.int32),
        expanded_local_pos=torch.zeros(n, dtype=torch.int32),
        input_ids=torch.zeros(n, dtype=torch.int32),
        pos=torch.zeros(n, dtype=torch.int32),
        seq_lens_upper_bound_np=np.ones(n, dtype=np.int32),
    )


def test_v2_request_indices_rows_and_recycling(registry: Registry) -> None:
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8)
    p = SVDLogitsProcessor(config(), req_states)
    assert p.runner == "v2"
    assert p.add_request(5, sp(svd=1, svd_vector="b")) is True
    assert p.add_request(2, sp()) is False
    assert p.add_request(7, sp(svd=1, svd_vector="a", svd_scale=-1.0)) is True
    p.apply_staged_writes()
    z = logits(3)
    out = p.apply(z.clone(), fake_ctx([2, 7, 5]))  # rows are not slots
    a, b = registry.load("a"), registry.load("b")
    assert torch.equal(out[0], z[0])
    torch.testing.assert_close(out[1], expected(z[1:2], a, 4.0, 0.1)[0])
    torch.testing.assert_close(out[2], expected(z[2:3], b, -9.0, 0.3)[0])
    # Slot 5 recycled for an unsteered request: its old state is gone.
    assert p.add_request(5, sp(svd=0)) is False
    out = p.apply(z.clone(), fake_ctx([5, 7]))
    assert torch.equal(out[0], z[0])
    # Speculative decoding: two rows for slot 7.
    z4 = logits(3, seed=3)
    ctx = fake_ctx([7, 7, 2])
    ctx = LogitsContext(**{**ctx.__dict__, "idx_mapping_np": np.array([7, 2], dtype=np.int32)})
    out = p.apply(z4.clone(), ctx)
    torch.testing.assert_close(out[:2], expected(z4[:2], a, 4.0, 0.1))
    assert torch.equal(out[2], z4[2])


def sampler_warmup_params() -> SamplingParams:
    """vLLM 0.33's ``SamplingParams.for_sampler_warmup()`` (copied where vLLM is older)."""
    made = getattr(SamplingParams, "for_sampler_warmup", None)
    if made is not None:
        return made()
    return SamplingParams(
        temperature=0.9,
        top_p=0.9,
        top_k=50,
        min_p=0.1,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        repetition_penalty=1.2,
        min_tokens=2,
        logit_bias={0: -1.0, 1: 0.5},
        logprobs=5,
        prompt_logprobs=1,
    )


def test_v2_sampler_warmup_leaves_no_state(registry: Registry) -> None:
    """vLLM 0.33's V2 runner warms its sampler up by adding the warm-up params to every slot,
    flushing, and sampling a dummy batch (``GPUModelRunner._dummy_sampler_run``), before any
    real request. Afterwards the processor must be as new: slots a steered request held are
    unsteered, nothing counts as active, and the next requests steer exactly as usual."""
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8)
    p = SVDLogitsProcessor(config(), req_states)
    fresh = SVDLogitsProcessor(
        config(max_seqs=4), SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8)
    )
    assert p.add_request(3, sp(svd=1, svd_vector="b")) is True  # e.g. left by a profile run
    p.apply_staged_writes()
    warm = sampler_warmup_params()
    assert [p.add_request(i, warm) for i in range(8)] == [False] * 8
    p.apply_staged_writes()
    z = logits(8)
    assert torch.equal(p.apply(z.clone(), fake_ctx(list(range(8)))), z)
    assert p.steering.slots.count == 0
    # Real traffic after the warm-up: identical to a processor that never warmed up.
    for proc in (p, fresh):
        assert proc.add_request(3, sp(svd=1, svd_vector="a")) is True
        assert proc.add_request(0, sp()) is False
        proc.apply_staged_writes()
    z2 = logits(2, seed=5)
    torch.testing.assert_close(
        p.apply(z2.clone(), fake_ctx([0, 3])), fresh.apply(z2.clone(), fake_ctx([0, 3]))
    )
    assert torch.equal(p.apply(z2.clone(), fake_ctx([0, 3]))[0], z2[0])


def test_second_instance_for_one_engine_is_inert(registry: Registry) -> None:
    cfg = config()
    first = SVDLogitsProcessor(cfg, "cpu", False)
    second = SVDLogitsProcessor(cfg, "cpu", False)
    assert not first.inert and second.inert
    second.update_state(
        BatchUpdate(
            batch_size=1, removed=[], added=[(0, sp(svd=1, svd_vector="a"), None, [])], moved=[]
        )
    )
    z = logits(1)
    assert torch.equal(second.apply(z.clone()), z)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"svd": "maybe"}, "vllm_xargs.svd must be 1 or 0"),
        ({"svd": 2}, "vllm_xargs.svd must be 1 or 0"),
        (
            {"svd": 1, "svd_vector": "a", "svd_scale": "big"},
            "vllm_xargs.svd_scale must be a number",
        ),
        ({"svd": 1, "svd_vector": "a", "svd_scale": "nan"}, "vllm_xargs.svd_scale must be finite"),
        ({"svd": 1, "svd_vector": "a", "svd_scale": 1e6}, "vllm_xargs.svd_scale must be within"),
        (
            {"svd": 1, "svd_vector": "a", "svd_alpha": 0},
            r"vllm_xargs.svd_alpha must be in \(0, 1\]",
        ),
        (
            {"svd": 1, "svd_vector": "a", "svd_alpha": 1.5},
            r"vllm_xargs.svd_alpha must be in \(0, 1\]",
        ),
        ({"svd": 1, "svd_vector": "zzz"}, "vllm_xargs.svd_vector: no steering vector named 'zzz'"),
        ({"svd_vector": "zzz"}, "no steering vector named 'zzz'"),
        ({"svd": 1}, "names no svd_vector and uses no LoRA adapter"),
        (
            {"svd": 1, LORA_KEY: "nolora"},
            "vllm_xargs.svd: no steering vector named 'nolora' for this request's LoRA",
        ),
        ({"svd": 1, "svd_vector": 5}, "vllm_xargs.svd_vector must be a vector name"),
    ],
)
def test_validate_params_names_the_field(registry: Registry, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SVDLogitsProcessor.validate_params(sp(**extra))


def test_validate_params_accepts_good_requests_and_checks_vocab(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for extra in (
        {},
        {"svd": 0},
        {"svd": 1, "svd_vector": "a"},
        {"svd": True, LORA_KEY: "b", "svd_scale": "0.5"},
        {LORA_KEY: "nolora"},
    ):
        validate_steering_params(extra)
    registry.update("a", enabled=False)
    with pytest.raises(ValueError, match="'a' is disabled"):
        validate_steering_params({"svd": 1, "svd_vector": "a"})
    set_served_vocab_size(128)  # the conftest resets it after every test
    with pytest.raises(ValueError, match="vocab_size 64 but the served model has 128"):
        validate_steering_params({"svd": 1, "svd_vector": "b"})


def test_a_vector_that_cannot_load_is_refused_by_name_or_counted(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit request for a corrupt vector is a 400 naming it and the reason;
    one steered only by the server default proceeds unsteered and is counted."""
    from prometheus_client import REGISTRY

    from svd_vllm.vllm import admission

    def skipped(reason: str) -> float:
        value = REGISTRY.get_sample_value("svd_vllm_default_unsteered_total", {"reason": reason})
        return value or 0.0

    validate_steering_params({"svd": 1, "svd_vector": "a"})  # fine while the file is intact
    path = registry.root / registry.get("a").file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip one byte of the tensor data
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as when it happens later
    for extra in ({"svd": 1, "svd_vector": "a"}, {"svd": 1, LORA_KEY: "a"}):
        with pytest.raises(ValueError, match=r"steering vector 'a' \(a@1#\w+\) cannot be loaded"):
            validate_steering_params(extra)
    validate_steering_params({"svd": 0, "svd_vector": "a"})  # off: only needs to exist
    monkeypatch.setenv("SVD_VLLM_DEFAULT", "on")
    with pytest.raises(ValueError, match="cannot be loaded"):  # named, and on by default
        validate_steering_params({"svd_vector": "a"})
    before = skipped("unloadable")
    validate_steering_params({LORA_KEY: "a"})  # the server default: proceeds...
    assert skipped("unloadable") == before + 1  # ...and is counted
    validate_steering_params({LORA_KEY: "b"})  # an intact vector is not counted
    validate_steering_params({LORA_KEY: "nolora"})  # nor an adapter without a vector
    assert skipped("unloadable") == before + 1
    registry.add(vec("a", 9, -1.0), replace=True)  # a good version: admitted again
    validate_steering_params({"svd": 1, "svd_vector": "a"})
    assert admission.served_vocab_size() is None


def test_request_arguments_default_to_the_server_and_lora() -> None:
    r = parse_request_args(None, server_default=False)
    assert not r.enabled and r.vector is None
    r = parse_request_args({LORA_KEY: "x"}, server_default=True)
    assert r.enabled and not r.explicit and r.vector == "x" and not r.vector_explicit
    r = parse_request_args(
        {"svd": "on", "svd_vector": "y", LORA_KEY: "x", "svd_scale": "2", "svd_alpha": 0.5}
    )
    assert r.enabled and r.explicit and r.vector == "y" and r.scale == 2.0 and r.alpha == 0.5
    assert (
        parse_request_args({"svd": 1.0}).enabled
        and not parse_request_args({"svd": "false"}).enabled
    )


# -- composition -------------------------------------------------------------------------
def composed_expected(
    z: torch.Tensor, parts: list[tuple[SteeringArtifact, float]], alpha: float
) -> torch.Tensor:
    """The reference maths: the SUM of each vector's own steering term, one mask."""
    mask = confidence_mask(z, alpha)
    term = sum(m * precomputed_delta(z, art.shift) for art, m in parts)
    assert isinstance(term, torch.Tensor)
    return torch.where(mask, z + term, torch.full_like(z, -math.inf))


def test_a_composition_steers_with_the_sum_of_its_vectors_terms(registry: Registry) -> None:
    registry.add(vec("c", 3, 2.0, alpha=0.05))
    p = SVDLogitsProcessor(config(), "cpu", False)
    added = [
        (0, sp(svd=1, svd_vector=["a", "b"], svd_scale=[0.5, 1.0]), None, []),
        (1, sp(svd=1, svd_vector="a"), None, []),  # a single vector beside it
        (2, sp(), None, []),  # unsteered
        (3, sp(svd=1, svd_vector=["b", "a", "c"]), None, []),  # default scales, min alpha
        (4, sp(svd=1, svd_vector=["a", "b"], svd_scale=[0.5, 1.0], svd_alpha=0.5), None, []),
    ]
    p.update_state(BatchUpdate(batch_size=5, removed=[], added=added, moved=[]))
    z = logits(5, seed=4)
    out = p.apply(z.clone())
    a, b, c = registry.load("a"), registry.load("b"), registry.load("c")
    torch.testing.assert_close(out[0], composed_expected(z[0:1], [(a, -2.0), (b, -9.0)], 0.1)[0])
    torch.testing.assert_close(out[1], expected(z[1:2], a, -4.0, 0.1)[0])
    assert torch.equal(out[2], z[2])
    torch.testing.assert_close(
        out[3], composed_expected(z[3:4], [(b, -9.0), (a, -4.0), (c, 2.0)], 0.05)[0]
    )
    torch.testing.assert_close(out[4], composed_expected(z[4:5], [(a, -2.0), (b, -9.0)], 0.5)[0])
    # Rows 0 and 4 share one combined slot (same versions and strengths); refcounted.
    assert p.store.rows_in_use() == 3  # a+b, a, b+a+c
    p.update_state(BatchUpdate(batch_size=0, removed=[0, 1, 2, 3, 4], added=[], moved=[]))
    assert p.store.rows_in_use() == 0


def test_a_composition_pins_every_member(registry: Registry) -> None:
    p = SVDLogitsProcessor(config(), "cpu", False)
    params = sp(svd=1, svd_vector=["a", "b"])
    p.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, None, [])], moved=[]))
    assert params.extra_args[PIN_KEY] == [registry.get("a").key, registry.get("b").key]
    a_old, b = registry.load("a"), registry.load("b")
    registry.add(vec("a", 77, -1.0), replace=True)  # one member replaced mid-request
    p.store.refresh()
    z = logits(1, seed=5)
    want = composed_expected(z, [(a_old, -4.0), (b, -9.0)], 0.1)
    torch.testing.assert_close(p.apply(z.clone()), want)
    # Preempted and re-added: still every pinned version.
    p.update_state(BatchUpdate(batch_size=1, removed=[0], added=[(0, params, None, [])], moved=[]))
    torch.testing.assert_close(p.apply(z.clone()), want)
    # A new request composes the new version of "a".
    fresh = sp(svd=1, svd_vector=["a", "b"])
    p.update_state(BatchUpdate(batch_size=2, removed=[], added=[(1, fresh, None, [])], moved=[]))
    z2 = logits(2, seed=6)
    out = p.apply(z2.clone())
    a_new = registry.load("a")
    torch.testing.assert_close(
        out[1], composed_expected(z2[1:2], [(a_new, -1.0), (b, -9.0)], 0.1)[0]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"svd": 1, "svd_vector": []}, r"vllm_xargs.svd_vector is an empty list"),
        ({"svd": 1, "svd_vector": [f"v{i}" for i in range(9)]}, "lists 9 vectors; at most 8"),
        ({"svd": 1, "svd_vector": ["a", "b", "a"]}, r"svd_vector\[2\]: 'a' is listed twice"),
        ({"svd": 1, "svd_vector": ["a", 3]}, r"svd_vector\[1\] must be a vector name"),
        (
            {"svd": 1, "svd_vector": ["a", "b"], "svd_scale": [1.0]},
            "has 1 values but svd_vector lists 2",
        ),
        ({"svd": 1, "svd_vector": ["a", "b"], "svd_scale": 0.5}, "must be a list of 2 numbers"),
        (
            {"svd": 1, "svd_vector": "a", "svd_scale": [0.5]},
            "svd_scale is a list, but svd_vector names one",
        ),
        (
            {"svd": 1, "svd_vector": ["a", "b"], "svd_scale": [1, "nan"]},
            r"svd_scale\[1\] must be finite",
        ),
        (
            {"svd": 1, "svd_vector": ["a", "b"], "svd_scale": [1, 1e9]},
            r"svd_scale\[1\] must be within",
        ),
        (
            {"svd": 1, "svd_vector": ["a", "zzz"]},
            r"svd_vector\[1\]: no steering vector named 'zzz'",
        ),
    ],
)
def test_composition_errors_name_the_field(registry: Registry, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SVDLogitsProcessor.validate_params(sp(**extra))


def test_composition_checks_every_member(registry: Registry) -> None:
    registry.update("b", enabled=False)
    with pytest.raises(ValueError, match=r"svd_vector\[1\]: steering vector 'b' is disabled"):
        validate_steering_params({"svd": 1, "svd_vector": ["a", "b"]})
    validate_steering_params({"svd": 0, "svd_vector": ["a", "b"]})  # off: existence only
    registry.update("b", enabled=True)
    registry.add(vec("wide", 4, -1.0, vocab=2 * V))
    set_served_vocab_size(V)
    with pytest.raises(ValueError, match=r"svd_vector\[0\]: .* vocab_size 128 but the served"):
        validate_steering_params({"svd": 1, "svd_vector": ["wide", "a"]})


def test_a_registered_composition_is_an_adapters_default_steering(registry: Registry) -> None:
    from svd_vllm.registry import RegistryError
    from svd_vllm.vllm.admission import admission_pin

    registry.compose("combo", [("a", 0.5), ("b", None)])
    p = SVDLogitsProcessor(config(), "cpu", False)
    params = sp(**{"svd": 1, LORA_KEY: "combo"})  # the LoRA adapter named like it
    validate_steering_params(params.extra_args)
    pin = admission_pin(params.extra_args)
    assert pin == [registry.get("a").key, registry.get("b").key]  # every member pinned
    added = [(0, params, None, []), (1, sp(svd=1, svd_vector="combo", svd_scale=2.0), None, [])]
    p.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    z = logits(2, seed=8)
    out = p.apply(z.clone())
    a, b = registry.load("a"), registry.load("b")
    torch.testing.assert_close(out[0], composed_expected(z[0:1], [(a, -2.0), (b, -9.0)], 0.1)[0])
    # svd_scale multiplies every member's scale.
    torch.testing.assert_close(out[1], composed_expected(z[1:2], [(a, -4.0), (b, -18.0)], 0.1)[0])
    # Its own alpha, if set, replaces the members' smallest.
    registry.compose("combo", [("a", 0.5), ("b", None)], alpha=0.6, replace=True)
    p.store.refresh()
    p.update_state(
        BatchUpdate(
            batch_size=2, removed=[], added=[(1, sp(svd=1, svd_vector="combo"), None, [])], moved=[]
        )
    )
    z2 = logits(2, seed=9)
    torch.testing.assert_close(
        p.apply(z2.clone())[1], composed_expected(z2[1:2], [(a, -2.0), (b, -9.0)], 0.6)[0]
    )
    # A name is a vector or a composition; members must exist and stay.
    with pytest.raises(RegistryError, match="is a vector"):
        registry.compose("a", [("b", None)])
    with pytest.raises(RegistryError, match="is a composition"):
        registry.add(vec("combo", 5, -1.0))
    with pytest.raises(RegistryError, match=r"members\[1\]: no vector named 'zz'"):
        registry.compose("c2", [("a", None), ("zz", None)])
    with pytest.raises(RegistryError, match="member of composition"):
        registry.remove("b")
    with pytest.raises(RegistryError, match="listed twice"):
        registry.compose("c3", [("a", None), ("a", 1.0)])
    registry.compose("combo", [("a", 0.5)], enabled=False, replace=True)
    with pytest.raises(ValueError, match="composition 'combo' is disabled"):
        validate_steering_params({"svd": 1, "svd_vector": "combo"})
