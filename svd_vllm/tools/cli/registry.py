"""Serving: the steering registry, managed directly (without a sidecar)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...registry import Registry

from .common import CLIError, _existing_file, _member_arg

if TYPE_CHECKING:
    from .common import _Sub


@contextlib.contextmanager
def _registry(args: argparse.Namespace) -> Iterator[Registry]:
    """The registry a ``registry`` subcommand works on; its refusals become CLI errors."""
    from ...registry import Registry, RegistryError

    try:
        yield Registry(args.registry)
    except RegistryError as e:
        raise CLIError(str(e)) from e


def _cmd_registry_list(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        rows = [e.model_dump() for e in reg.list()]
        rows += [{"composition": True, **c.model_dump()} for c in reg.compositions()]
        rows += [{"preset": True, **p.model_dump()} for p in reg.presets()]
    print(json.dumps(rows, indent=2))
    return 0


def _cmd_registry_add(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        e = reg.add_file(args.file, name=args.name, replace=args.replace)
    print(f"registered {e.key} ({e.content_hash[:19]}) in {reg.root}")
    return 0


def _cmd_registry_compose(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ...core.validation import pydantic_message

    members = [_member_arg(v) for v in args.vector]
    with _registry(args) as reg:
        try:
            c = reg.compose(
                args.name, members, alpha=args.alpha, enabled=not args.disable, replace=args.replace
            )
        except ValidationError as err:
            raise CLIError(f"invalid composition: {pydantic_message(err)}") from err
    shown = ", ".join(f"{m.vector}x{'default' if m.scale is None else m.scale}" for m in c.members)
    print(f"composition {c.name} v{c.version}: {shown}")
    return 0


def _cmd_registry_preset(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        if args.remove:
            p = reg.remove_preset(args.name)
            print(f"removed preset {p.name} v{p.version}")
            return 0
        if args.scale is None:
            raise CLIError("registry preset: give --scale (or --remove)")
        p = reg.set_preset(args.name, args.scale, alpha=args.alpha)
    print(
        f"preset {p.name} v{p.version}: scale {p.scale:g}"
        + (f", alpha {p.alpha:g}" if p.alpha is not None else "")
        + f" (every steered model is offered as MODEL:svd-{p.name})"
    )
    return 0


def _cmd_registry_remove(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        if args.name in reg.manifest().compositions:
            c = reg.remove_composition(args.name)
            print(f"removed composition {c.name} v{c.version}")
        else:
            e = reg.remove(args.name)
            print(f"removed {e.key}")
    return 0


def _cmd_registry_set(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ...core.validation import pydantic_message
    from ...registry import SettingsPatch

    given = {
        "default_scale": args.scale,
        "mu_bar": args.mu,
        "alpha": args.alpha,
        "enabled": bool(args.enable) if args.enable or args.disable else None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        raise CLIError("nothing to change: pass --scale, --mu, --alpha, --enable or --disable")
    try:
        patch = SettingsPatch(**given)
    except ValidationError as err:
        raise CLIError(f"invalid settings: {pydantic_message(err)}") from err
    with _registry(args) as reg:
        e = reg.update(args.name, patch)
    print(f"updated {e.key}: effective mu {e.strength():+.4g}, alpha {e.mask_alpha():g}")
    return 0


def _add_registry(sub: _Sub) -> None:
    """``registry``: the registry directory, without a sidecar."""
    r = sub.add_parser("registry", help="manage the steering-vector registry directly")
    r.add_argument("--registry", help="registry directory (default: $SVD_VLLM_REGISTRY)")
    rsub = r.add_subparsers(dest="registry_command", required=True)
    rsub.add_parser("list", help="list vectors").set_defaults(func=_cmd_registry_list)

    ra = rsub.add_parser("add", help="register an artifact file")
    ra.add_argument("file", type=_existing_file, help="the artifact (.safetensors)")
    ra.add_argument("--name", help="register under this name (default: the artifact's)")
    ra.add_argument("--replace", action="store_true", help="a new version of an existing name")
    ra.set_defaults(func=_cmd_registry_add)

    rc = rsub.add_parser("compose", help="name a composition of vectors (an adapter's default)")
    rc.add_argument("name", help="usually the LoRA adapter's name")
    rc.add_argument(
        "--vector", action="append", required=True, help="NAME or NAME=SCALE (repeatable, up to 8)"
    )
    rc.add_argument("--alpha", type=float, help="mask threshold (default: the members' min)")
    rc.add_argument("--disable", action="store_true", help="register it switched off")
    rc.add_argument("--replace", action="store_true", help="a new version of an existing name")
    rc.set_defaults(func=_cmd_registry_compose)

    rp = rsub.add_parser(
        "preset",
        help="name a strength: every adapter that can steer is offered as MODEL:svd-NAME too",
    )
    rp.add_argument("name", help="lowercase letters, digits, '_' or '-' (e.g. strong)")
    rp.add_argument("--scale", type=float, help="the svd_scale it stands for")
    rp.add_argument("--alpha", type=float, help="the svd_alpha it stands for (default: none)")
    rp.add_argument("--remove", action="store_true", help="remove the preset")
    rp.set_defaults(func=_cmd_registry_preset)

    rr = rsub.add_parser("remove", help="remove a vector or a composition")
    rr.add_argument("name", help="the vector's or composition's name")
    rr.set_defaults(func=_cmd_registry_remove)

    rs = rsub.add_parser("set", help="change strength settings (bumps the version)")
    rs.add_argument("name", help="the vector's name")
    rs.add_argument("--scale", type=float, help="default scale")
    rs.add_argument("--mu", type=float, help="mu_bar override")
    rs.add_argument("--alpha", type=float, help="alpha override")
    en = rs.add_mutually_exclusive_group()
    en.add_argument("--enable", action="store_true", help="serve it again")
    en.add_argument("--disable", action="store_true", help="stop serving it (kept registered)")
    rs.set_defaults(func=_cmd_registry_set)
