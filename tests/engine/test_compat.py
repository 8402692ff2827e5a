"""vLLM compatibility: the declared range, the interface checks, and what the plugin does on a
vLLM that differs (fail at engine start; never trust client-sent internal keys)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from svd_vllm.registry.request import LORA_KEY, PIN_KEY
from svd_vllm.vllm import admission, compat, plugin

ROOT = Path(__file__).resolve().parents[2]


def vllm_source() -> Path:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent.parent


def test_the_installed_vllm_passes_both_checks() -> None:
    import vllm

    assert compat.in_range(vllm.__version__)
    assert compat.installed_problems() == []
    assert compat.source_problems(vllm_source()) == []  # the static check agrees with it


@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("0.30.2", False),
        ("0.31.0", True),
        ("0.32.0", True),
        ("0.33.0", True),
        ("0.33.1rc1", True),
        ("0.34.0", False),
        ("1.0.0", False),
    ],
)
def test_declared_vllm_range_contains_exactly_the_supported_versions(
    version: str, inside: bool
) -> None:
    assert compat.in_range(version) is inside


@pytest.fixture
def copied_vllm(tmp_path: Path) -> Path:
    """The installed vLLM's sources of the modules the plugin reads, to mutate."""
    src = vllm_source()
    for req in compat.REQUIREMENTS:
        rel = Path(*req.module.split("."))
        for p in (rel.with_suffix(".py"), rel):
            if (src / p).is_file():
                (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / p, tmp_path / p)
            elif (src / p).is_dir():
                shutil.copytree(
                    src / p,
                    tmp_path / p,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
    assert compat.source_problems(tmp_path) == []
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_the_source_check_names_each_change(copied_vllm: Path) -> None:
    ip = copied_vllm / "vllm/v1/engine/input_processor.py"
    _edit(ip, "        lora_request: LoRARequest | None = None,\n", "")
    v2 = copied_vllm / "vllm/v1/worker/gpu/sample/logits_processor/interface.py"
    _edit(v2, "    expanded_idx_mapping: torch.Tensor\n", "")
    _edit(
        v2,
        "    def apply_staged_writes(self) -> None:  # noqa: B027",
        "    @abstractmethod\n    def apply_staged_writes(self) -> None:  # noqa: B027",
    )
    problems = compat.source_problems(copied_vllm)
    assert problems == [
        "vllm.v1.engine.input_processor.InputProcessor.process_inputs no longer takes lora_request",
        "vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor has new abstract methods "
        "['apply_staged_writes']",
        "vllm.v1.worker.gpu.sample.logits_processor.LogitsContext has no expanded_idx_mapping",
    ]


def test_a_release_without_either_runner_interface_is_refused(copied_vllm: Path) -> None:
    # The processor module imports both interfaces: a release lacking one cannot load it.
    shutil.rmtree(copied_vllm / "vllm/v1/worker")
    assert (
        compat.source_problems(copied_vllm)
        == ["vllm.v1.worker.gpu.sample.logits_processor is missing"] * 3
    )
    shutil.rmtree(copied_vllm / "vllm/v1/sample")
    assert (
        compat.source_problems(copied_vllm)
        == ["vllm.v1.sample.logits_processor is missing"] * 3
        + ["vllm.v1.worker.gpu.sample.logits_processor is missing"] * 3
    )


def test_engine_start_fails_loudly_on_a_changed_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm
    from vllm.v1.engine.input_processor import InputProcessor

    def changed(self, request_id, prompt, params, supported_tasks):  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(InputProcessor, "process_inputs", changed)
    with pytest.raises(plugin.UnsupportedVLLMError) as e:
        plugin.register()
    message = str(e.value)
    assert vllm.__version__ in message and ">=0.31" in message and "<0.34" in message
    assert "process_inputs no longer takes lora_request" in message
    assert not admission._state.stamping  # nothing was patched


def test_without_the_plugin_internal_keys_from_clients_are_refused(tmp_path: Path) -> None:
    """VLLM_PLUGINS may leave the general plugin out: then no stamp can be trusted."""
    admission.set_stamping(False)
    for key in (LORA_KEY, PIN_KEY):
        with pytest.raises(ValueError, match=f"vllm_xargs.{key} is written by svd-vllm"):
            admission.validate_steering_params({"svd": 1, key: "victim@1"})
    with pytest.raises(ValueError, match="plugin is not active"):
        admission.validate_steering_params({"svd": 1})
    admission.validate_steering_params({"svd": 0})  # nothing asked: nothing refused
    admission.set_stamping(True)  # with the plugin, stamps are ours (it strips clients' copies)
    with pytest.raises(ValueError, match="no steering vector named 'victim'"):
        admission.validate_steering_params({"svd": 1, LORA_KEY: "victim"})


@pytest.mark.compat
def test_vllm_0_33_wheel_interfaces(tmp_path: Path) -> None:
    """vLLM 0.33.0 has no CPU build: check its wheel's sources (downloaded once, cached)."""
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "compat_report.py"),
            "vllm==0.33.0",
            "--out",
            str(tmp_path / "report.md"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ.copy(),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| `vllm==0.33.0` | vllm-0.33.0-" in (tmp_path / "report.md").read_text()
