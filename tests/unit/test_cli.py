"""The ``svd-vllm`` command line: its options explain themselves, its registry verbs work and
refuse bad input with exit status 2 (the offline verbs are exercised in test_pipeline.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from svd_vllm.registry import Registry
from svd_vllm.tools.cli import build_parser, main
from tests.support.artifacts import random_vector


def _options_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _options_without_help(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            out.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return out


def test_every_option_of_every_subcommand_has_help() -> None:
    assert _options_without_help(build_parser(), "svd-vllm") == []


def test_eval_help_lists_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    from svd_vllm.offline.evaluation import METHODS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for method in METHODS:
        assert method in text
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--base", ".", "--adapter", ".", "--task", "t", "--method", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_registry_composes_lists_and_removes_compositions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path)
    reg.add(random_vector("a", seed=1))
    reg.add(random_vector("b", seed=2))
    base = ["registry", "--registry", str(tmp_path)]
    assert main([*base, "compose", "mix", "--vector", "a=0.5", "--vector", "b"]) == 0
    c = reg.manifest().compositions["mix"]
    assert [(m.vector, m.scale) for m in c.members] == [("a", 0.5), ("b", None)]
    assert main([*base, "compose", "mix", "--vector", "a"]) == 2  # exists: --replace
    assert main([*base, "compose", "mix", "--vector", "a", "--replace", "--alpha", "0.4"]) == 0
    assert reg.manifest().compositions["mix"].version == 2
    assert main([*base, "compose", "x", "--vector", "a=half"]) == 2
    assert main([*base, "compose", "x", "--vector", "a", "--alpha", "2"]) == 2
    capsys.readouterr()
    assert main([*base, "list"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r.get("name") for r in rows] == ["a", "b", "mix"] and rows[-1]["composition"]
    assert main([*base, "remove", "mix"]) == 0 and reg.manifest().compositions == {}


def test_registry_add_set_preset_and_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from svd_vllm.core import artifact

    path = artifact.save(random_vector("v", mu=-2.0), tmp_path / "v.safetensors")
    base = ["registry", "--registry", str(tmp_path / "reg")]
    reg = Registry(tmp_path / "reg")
    assert main([*base, "add", str(path)]) == 0 and reg.get("v").version == 1
    assert main([*base, "add", str(path)]) == 2  # the name exists: --replace
    assert main([*base, "set", "v", "--scale", "0.5", "--alpha", "0.2", "--disable"]) == 0
    e = reg.get("v")
    assert (e.version, e.default_scale, e.mask_alpha(), e.enabled) == (2, 0.5, 0.2, False)
    assert "effective mu -1" in capsys.readouterr().out  # -2.0 * 0.5
    assert main([*base, "set", "v"]) == 2  # nothing to change
    assert main([*base, "set", "v", "--alpha", "1.5"]) == 2  # outside (0, 1]
    assert main([*base, "set", "v", "--scale", "nan"]) == 2
    assert reg.get("v").version == 2  # refused changes wrote nothing
    assert main([*base, "preset", "strong", "--scale", "2"]) == 0
    assert reg.manifest().presets["strong"].scale == 2.0
    assert main([*base, "preset", "weak"]) == 2  # needs --scale
    assert main([*base, "preset", "strong", "--remove"]) == 0 and not reg.manifest().presets
    assert main([*base, "remove", "v"]) == 0 and reg.list() == []
    assert main([*base, "remove", "v"]) == 2


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from svd_vllm import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"svd-vllm {__version__}"


def test_help_imports_neither_torch_nor_vllm() -> None:
    """`svd-vllm --help` (and every subcommand's) answers at once: no heavy library is imported."""
    import subprocess
    import sys

    probe = (
        "import argparse, sys\n"
        "from svd_vllm.tools.cli import build_parser\n"
        "p = build_parser()\n"
        "p.format_help()\n"
        "for a in p._actions:\n"
        "    if isinstance(a, argparse._SubParsersAction):\n"
        "        [s.format_help() for s in a.choices.values()]\n"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'peft') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_help_lists_every_command_once_under_serving_or_research() -> None:
    import argparse

    from svd_vllm.tools.cli import GROUPS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(sub.choices)
    text = parser.format_help()
    assert text.index("serving:") < text.index("serve ") < text.index("research")
