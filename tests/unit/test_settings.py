"""Settings: every SVD_VLLM_* variable read and checked in one place, documented from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from svd_vllm.core.settings import EngineSettings, SettingsError, describe, engine_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SVD_VLLM_HOST_CACHE", "zero", "SVD_VLLM_HOST_CACHE='zero' is not an integer"),
        ("SVD_VLLM_HOST_CACHE", "0", "SVD_VLLM_HOST_CACHE='0' must be >= 1"),
        ("SVD_VLLM_KERNEL", "trition", "SVD_VLLM_KERNEL='trition' is not one of auto, torch"),
        ("SVD_VLLM_DEFAULT", "maybe", "SVD_VLLM_DEFAULT='maybe' must be 'on' or 'off'"),
        ("SVD_VLLM_MAX_SCALE", "inf", "SVD_VLLM_MAX_SCALE='inf' is not a finite number"),
        ("SVD_VLLM_MAX_SCALE", "-1", "SVD_VLLM_MAX_SCALE='-1' must be > 0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=re.escape(says)):
        engine_settings()


def test_values_are_read_as_users_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DEFAULT": " ON ",
        "KERNEL": "Torch",
        "HOST_CACHE": "5",
        "REGISTRY": "~/reg",
        "CACHE": "",
    }.items():
        monkeypatch.setenv(f"SVD_VLLM_{name}", value)
    s = engine_settings()
    assert (s.default, s.kernel, s.host_cache) == (True, "torch", 5)
    assert s.registry == Path.home() / "reg"  # expanded
    assert s.cache == Path.home() / ".cache" / "svd-vllm"  # empty: the default


def test_a_changed_environment_is_seen_by_the_next_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Reads are cached per environment (the token path reads on every request): a change,
    a variable set in another case, one removed, a bad value, and ``HOME`` are all seen."""
    monkeypatch.delenv("SVD_VLLM_DEFAULT", raising=False)
    assert engine_settings().default is False
    monkeypatch.setenv("SVD_VLLM_DEFAULT", "on")
    assert engine_settings().default is True
    monkeypatch.delenv("SVD_VLLM_DEFAULT")
    monkeypatch.setenv("svd_vllm_default", "on")  # pydantic-settings takes any case
    assert engine_settings().default is True
    monkeypatch.delenv("svd_vllm_default")
    assert engine_settings().default is False
    monkeypatch.setenv("SVD_VLLM_DEFAULT", "maybe")
    for _ in range(2):  # refused every time, never cached as a good value
        with pytest.raises(SettingsError):
            engine_settings()
    monkeypatch.delenv("SVD_VLLM_DEFAULT")
    monkeypatch.setenv("SVD_VLLM_REGISTRY", "~/reg")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert engine_settings().registry == tmp_path / "reg"


def test_vllm_refuses_to_start_on_a_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin checks every setting when vLLM loads it, before it patches anything."""
    pytest.importorskip("vllm")
    from svd_vllm.vllm import plugin

    monkeypatch.setenv("SVD_VLLM_HOST_CACHE", "-3")
    with pytest.raises(SettingsError, match="SVD_VLLM_HOST_CACHE='-3' must be >= 1"):
        plugin.register()


def test_only_the_settings_module_reads_the_environment() -> None:
    """One place reads the process environment, so every variable the package takes is there."""
    readers = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "svd_vllm").rglob("*.py")
        if "os.environ" in p.read_text() or "getenv(" in p.read_text()
    )
    assert readers == ["svd_vllm/core/settings.py"]


def test_the_configuration_page_lists_every_setting_as_the_code_defines_it() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_doc.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    page = (ROOT / "docs" / "configuration.md").read_text()
    for setting in describe(EngineSettings):
        assert f"| `{setting.variable}` |" in page


def test_sidecar_help_lists_every_setting() -> None:
    from svd_sidecar.__main__ import build_parser
    from svd_sidecar.settings import SidecarSettings

    text = build_parser().format_help()
    assert all(s.variable in text for s in describe(SidecarSettings))
    assert "``" not in text
