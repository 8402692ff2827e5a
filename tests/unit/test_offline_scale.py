"""Offline tools at scale: placement rules, batched passes that equal per-item ones, bounded
chunks, clear length errors, resumable warm starts, and CPU-vs-CUDA agreement (on a GPU)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from svd_vllm.core.steering import confidence_mask, log_ratio
from svd_vllm.offline import precision
from svd_vllm.offline.evaluation import MethodSpec, evaluate_items
from svd_vllm.offline.extraction import CalibrationItem, encode_items, extract_vector
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.offline.tasks import Item
from svd_vllm.offline.warmstart import WarmStartConfig, _Checkpoint, train_adapter
from svd_vllm.tools.cli import main as cli_main

WORDS = "the color of sky is blue red green a cat dog runs fast slow sun leaf snow".split()


def _items(n: int, seed: int = 0) -> list[CalibrationItem]:
    rnd = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))

    return [CalibrationItem(words(1, 12), " " + words(1, 5)) for _ in range(n)]


@pytest.fixture(scope="module")
def decoder(tiny_dirs: tuple[Path, Path]) -> ReferenceDecoder:
    return ReferenceDecoder(*tiny_dirs)


# -- placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_is_bf16_only_where_it_is_fast(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: native)
    cpu = torch.device("cpu")
    assert precision.resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert precision.resolve_dtype("float16", cpu) == torch.float16  # asked for: honoured
    with pytest.raises(ValueError, match="unknown dtype"):
        precision.resolve_dtype("int8", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    assert precision.resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        precision.resolve_device("cuda")
    with pytest.raises(ValueError, match=r"unsupported device|unknown device"):
        precision.resolve_device("tpu")
    rc = cli_main(
        [
            "extract",
            "--base",
            str(tiny_dirs[0]),
            "--adapter",
            str(tiny_dirs[1]),
            "--task",
            str(_jsonl(tmp_path, 2)),
            "--out",
            str(tmp_path / "v.safetensors"),
            "--device",
            "cuda",
        ]
    )
    assert rc == 2 and not (tmp_path / "v.safetensors").exists()


def _jsonl(tmp_path: Path, n: int) -> Path:
    import json

    path = tmp_path / "calib.jsonl"
    rows = [{"prompt": it.prompt, "completion": it.completion} for it in _items(n, seed=5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- batched passes ----------------------------------------------------------------------------
def test_batched_extraction_equals_one_item_at_a_time(decoder: ReferenceDecoder) -> None:
    items = _items(30)
    one, _ = extract_vector(
        decoder, items, name="t", progress=False, batch_size=1, bootstrap_reps=20
    )
    many, rep = extract_vector(
        decoder, items, name="t", progress=False, batch_size=7, bootstrap_reps=20
    )
    assert rep.extra["batches"] < len(items)
    torch.testing.assert_close(many.shift, one.shift, rtol=1e-5, atol=1e-6)
    assert many.meta.mu_bar == pytest.approx(one.meta.mu_bar, rel=1e-4)
    assert many.meta.mu_bar_exact == pytest.approx(one.meta.mu_bar_exact, rel=1e-4)
    # ... and equals the definition: the plain-mean shift is the mean log ratio over every
    # completion position, each item run alone through the unbatched decoder.
    rows = []
    for ids in encode_items(decoder, items):
        z_a, z_b = decoder.logits(ids.ids)
        assert z_a is not None
        rows.append(log_ratio(z_a, z_b)[ids.n_ctx - 1 : len(ids.ids) - 1])
    if many.meta.shift_weighting == "mean":
        torch.testing.assert_close(many.shift, torch.cat(rows).mean(0), rtol=1e-4, atol=1e-5)


def test_float32_work_is_chunked(
    decoder: ReferenceDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No call of the mask (the first float32 [rows, V] op) sees more rows than a chunk holds,
    and the chunked result equals the unchunked one."""
    import svd_vllm.offline.extraction as extraction

    items = _items(12, seed=3)
    whole, _ = extract_vector(decoder, items, name="t", progress=False, bootstrap_reps=0)
    monkeypatch.setattr(precision, "CHUNK_ELEMENTS", decoder.vocab_size * 3)
    seen: list[int] = []

    def spy(z: torch.Tensor, alpha: float) -> torch.Tensor:
        seen.append(z.shape[0])
        return confidence_mask(z, alpha)

    monkeypatch.setattr(extraction, "confidence_mask", spy)
    chunked, _ = extract_vector(decoder, items, name="t", progress=False, bootstrap_reps=0)
    assert seen and max(seen) <= 3
    torch.testing.assert_close(chunked.shift, whole.shift, rtol=1e-5, atol=1e-6)
    assert chunked.meta.mu_bar == pytest.approx(whole.meta.mu_bar, rel=1e-4)


def test_batched_evaluation_equals_the_unbatched_scores(decoder: ReferenceDecoder) -> None:
    rnd = random.Random(1)

    def item(i: int) -> Item:
        texts = [
            " " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 4))) for _ in range(3)
        ]
        gold = rnd.randrange(3)
        return Item(
            id=str(i),
            task="toy",
            prompt=" ".join(rnd.choice(WORDS) for _ in range(5)),
            completion=texts[gold],
            options=[{"text": t, "correct": k == gold} for k, t in enumerate(texts)],
        )

    items = [item(i) for i in range(10)]
    shift = torch.randn(decoder.vocab_size)
    specs = [
        MethodSpec("base", "base"),
        MethodSpec("peft", "adapter"),
        MethodSpec("exact", "svd-exact", -2.0, 0.1),
        MethodSpec("pre", "svd-precomputed", -3.0, 0.1, shift),
    ]
    batched = evaluate_items(decoder, items, specs, progress=False, batch_size=4)
    single = evaluate_items(decoder, items, specs, progress=False, batch_size=1)
    for s in specs:
        assert batched[s.name]["acc"] == single[s.name]["acc"]
    # The scores are the decoder's own teacher-forced log-likelihoods (its unbatched `score`).
    for it, acc in zip(items, batched["peft"]["acc"], strict=True):
        lls = decoder.score(it.prompt, [o["text"] for o in it.options], "adapter")
        best = max(range(3), key=lambda k: lls[k].mean_logprob)
        assert acc == float(best == it.gold)


def test_too_long_items_are_refused_with_the_limit(decoder: ReferenceDecoder) -> None:
    long = CalibrationItem(" ".join(["sky"] * 40), " blue")
    with pytest.raises(
        ValueError, match=r"calibration item 1 is 42 tokens, over the maximum length 16"
    ):
        extract_vector(decoder, [_items(1)[0], long], name="t", progress=False, max_length=16)
    with pytest.raises(ValueError, match="over the maximum length 16"):
        evaluate_items(
            decoder,
            [
                Item(
                    id="0",
                    task="t",
                    prompt=long.prompt,
                    completion=" blue",
                    options=[{"text": " blue", "correct": True}],
                )
            ],
            [MethodSpec("peft", "adapter")],
            progress=False,
            max_length=16,
        )


# -- warm start --------------------------------------------------------------------------------
def test_interrupted_warm_start_resumes_to_the_same_adapter(
    tiny_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    examples = [(it.prompt, it.completion) for it in _items(24, seed=7)]
    cfg = WarmStartConfig(lr=1e-2, batch_size=4, grad_accum=2, checkpoint_every=1, dtype="float32")
    straight = train_adapter(tiny_dirs[0], examples, tmp_path / "a", cfg, progress=False)
    assert straight.steps == 3 and straight.resumed_from_step == 0  # 6 batches, 2 per step

    real_save = _Checkpoint.save
    saves = []

    def crash_after_second(self, *args, **kw):  # type: ignore[no-untyped-def]
        real_save(self, *args, **kw)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as a kill would, right after a checkpoint

    monkeypatch.setattr(_Checkpoint, "save", crash_after_second)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_dirs[0], examples, tmp_path / "b", cfg, progress=False)
    assert (tmp_path / "b.partial" / "trainer.pt").exists() and not (tmp_path / "b").exists()
    monkeypatch.setattr(_Checkpoint, "save", real_save)

    # A different config must not pick up that checkpoint.
    other = WarmStartConfig(
        lr=2e-2, batch_size=4, grad_accum=2, checkpoint_every=1, dtype="float32"
    )
    with pytest.raises(ValueError, match="different warm start"):
        train_adapter(tiny_dirs[0], examples, tmp_path / "b", other, progress=False)

    resumed = train_adapter(tiny_dirs[0], examples, tmp_path / "b", cfg, progress=False)
    assert resumed.resumed_from_step == 2 and not (tmp_path / "b.partial").exists()
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    assert resumed.last_loss == pytest.approx(straight.last_loss, rel=1e-5)


def test_gradient_checkpointing_trains_the_same_adapter(
    tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    examples = [(it.prompt, it.completion) for it in _items(8, seed=9)]
    plain = WarmStartConfig(lr=1e-2, batch_size=4, dtype="float32", lora_dropout=0.0)
    ckpt = WarmStartConfig(
        lr=1e-2, batch_size=4, dtype="float32", lora_dropout=0.0, gradient_checkpointing=True
    )
    train_adapter(tiny_dirs[0], examples, tmp_path / "p", plain, progress=False)
    train_adapter(tiny_dirs[0], examples, tmp_path / "c", ckpt, progress=False)
    a = load_file(tmp_path / "p" / "adapter_model.safetensors")
    b = load_file(tmp_path / "c" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


# -- across devices ----------------------------------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_extraction_agrees_with_cpu_float32(tiny_dirs: tuple[Path, Path]) -> None:
    """Tolerance: the shift's cosine similarity >= 0.999 and the strength within 2%."""
    items = _items(64, seed=11)
    cpu = ReferenceDecoder(*tiny_dirs, device="cpu", dtype="float32")
    gpu = ReferenceDecoder(*tiny_dirs, device="cuda", dtype="auto")
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    ref, _ = extract_vector(cpu, items, name="t", progress=False, bootstrap_reps=20)
    got, _ = extract_vector(gpu, items, name="t", progress=False, bootstrap_reps=20)
    assert torch.isfinite(got.shift).all()
    assert got.meta.shift_weighting == ref.meta.shift_weighting
    assert _cosine(got.shift, ref.shift) >= 0.999
    key = f"precomputed_{ref.meta.estimator}"
    assert got.meta.calibration.estimators[key] == pytest.approx(
        ref.meta.calibration.estimators[key], rel=0.02
    )
