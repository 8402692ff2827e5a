"""``svd-vllm demo --tiny``: steer a LoRA-adapted tiny model; base / adapter / SVD side by side.

This offline demo builds the tiny model and a random LoRA itself (seconds, no downloads),
takes the adapter's own greedy continuations of a few prompts as its "task", extracts and
calibrates a steering vector on them, and decodes held-out prompts in every mode.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core import artifact
from ..core.steering import Mode
from ..offline.assets import cache_dir
from ..offline.extraction import CalibrationItem, extract_vector
from ..offline.reference import ReferenceDecoder

__all__ = ["run_tiny_demo"]

CALIB_PROMPTS = [
    "the color of sky is",
    "the color of grass is",
    "what is the color of snow ? answer :",
    "the sun is",
    "one two three",
    "question : is the sea blue ? answer :",
    "the color of fire and blood is",
    "a leaf is",
]
TEST_PROMPTS = [
    "the color of night is",
    "what is the color of the sea ? answer :",
    "two three four",
]


def run_tiny_demo(workdir: Path | None = None) -> int:
    from .tiny import build_tiny_lora, build_tiny_model

    t0 = time.time()
    root = (workdir or cache_dir()) / "demo-tiny"
    base, lora = root / "base", root / "lora"
    if not (base / "config.json").exists():
        print(f"[1/4] building the tiny model in {base}")
        build_tiny_model(base, seed=0)
    if not (lora / "adapter_config.json").exists():
        print(f"[1/4] building a LoRA adapter in {lora}")
        build_tiny_lora(base, lora, seed=1)
    dec = ReferenceDecoder(base, lora)
    print("[2/4] task data: the adapter's own greedy continuations of 8 prompts")
    items = [
        CalibrationItem(p, dec.generate(p, "adapter", max_new_tokens=6).text) for p in CALIB_PROMPTS
    ]
    print("[3/4] extracting and calibrating the steering vector")
    art, _ = extract_vector(dec, items, name="demo-tiny", progress=True)
    vec_path = artifact.save(art, root / "demo-tiny.safetensors")
    dec.set_vector(art)
    m = art.meta
    print(
        f"      saved {vec_path}\n      mu_bar (precomputed, {m.estimator}, {m.shift_weighting} "
        f"shift) = {m.mu_bar:+.3f}   mu_bar_exact = {m.mu_bar_exact:+.3f}   alpha = {m.alpha}"
    )
    nll = m.calibration.nll
    print(
        f"      calibration NLL: adapter {nll['unsteered']:.3f} -> "
        f"precomputed {nll['precomputed_' + m.estimator]:.3f}"
    )
    print("[4/4] greedy decoding of held-out prompts, side by side")
    modes: tuple[Mode, ...] = ("base", "adapter", "svd-exact", "svd-precomputed")
    for p in TEST_PROMPTS:
        print(f"\n  prompt: {p!r}")
        for mode in modes:
            res = dec.generate(p, mode, max_new_tokens=8)
            print(f"    {mode:>16}: {res.text}")
    print(f"\ndone in {time.time() - t0:.1f}s (a random tiny model: expect word salad, not sense).")
    return 0
