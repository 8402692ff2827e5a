"""Which vLLM releases the plugin runs on, and the interface checks that decide it.

One declared range (``SUPPORTED_VLLM``) and one list of the vLLM names the plugin relies on
(``REQUIREMENTS``). The list is checked two ways from the same declarations:

* ``installed_problems()`` -- on the vLLM that is imported (``inspect``), when the plugin loads:
  any problem stops the engine with a message naming the version and the range.
* ``source_problems(root)`` -- on a vLLM source tree or unpacked wheel, without importing it
  (``ast``), for releases with no CPU build (``make compat``, ``tests/engine/test_compat.py``).

Adding a release: widen the range, run ``make compat`` (or the engine tests), add a row to
``docs/compatibility.md``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = [
    "REQUIREMENTS",
    "SUPPORTED_VLLM",
    "Requirement",
    "in_range",
    "installed_problems",
    "source_problems",
]

#: The vLLM releases svd-vllm is verified on (docs/compatibility.md says how, per release).
SUPPORTED_VLLM = SpecifierSet(">=0.31,<0.34")


@dataclass(frozen=True)
class Requirement:
    """A class the plugin uses, and what of it: method parameters, abstract methods, fields."""

    module: str
    name: str
    #: method -> parameter names it must accept (besides ``self``)
    params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the abstract methods must be among these (the processors implement exactly these)
    abstract_within: frozenset[str] | None = None
    #: attributes (dataclass fields, enum members) the processors read
    fields: frozenset[str] = frozenset()

    @property
    def what(self) -> str:
        return f"{self.module}.{self.name}"


REQUIREMENTS: tuple[Requirement, ...] = (
    # The adapter-identity hook wraps this (private API): it must see the params and the LoRA.
    Requirement(
        "vllm.v1.engine.input_processor",
        "InputProcessor",
        params={"process_inputs": ("params", "lora_request")},
    ),
    Requirement("vllm.lora.request", "LoRARequest", fields=frozenset({"lora_name"})),
    # Steered model names in vLLM's own front (``model_names``, private API).
    Requirement(
        "vllm.entrypoints.serve.engine.serving",
        "BaseServing",
        params={
            "_check_model": ("request",),
            "_maybe_get_adapters": ("request",),
            "create_error_response": ("message", "err_type", "status_code", "param"),
        },
    ),
    Requirement(
        "vllm.entrypoints.openai.models.serving",
        "OpenAIServingModels",
        params={"show_available_models": ()},
    ),
    # The processor's start-up log names its worker's rank.
    Requirement(
        "vllm.config.parallel",
        "ParallelConfig",
        fields=frozenset({"rank", "tensor_parallel_size", "pipeline_parallel_size"}),
    ),
    # V1 runner interface.
    Requirement(
        "vllm.v1.sample.logits_processor",
        "LogitsProcessor",
        params={
            "__init__": ("vllm_config", "device", "is_pin_memory"),
            "apply": ("logits",),
            "update_state": ("batch_update",),
        },
        abstract_within=frozenset({"__init__", "apply", "is_argmax_invariant", "update_state"}),
    ),
    Requirement(
        "vllm.v1.sample.logits_processor",
        "BatchUpdate",
        fields=frozenset({"batch_size", "removed", "added", "moved"}),
    ),
    Requirement(
        "vllm.v1.sample.logits_processor",
        "MoveDirectionality",
        fields=frozenset({"UNIDIRECTIONAL", "SWAP"}),
    ),
    # V2 runner interface (the CUDA default from 0.32; ``processor`` imports it, so required).
    Requirement(
        "vllm.v1.worker.gpu.sample.logits_processor",
        "LogitsProcessor",
        params={
            "__init__": ("vllm_config", "req_states"),
            "apply": ("logits", "ctx"),
            "add_request": ("req_idx", "sampling_params"),
            "apply_staged_writes": (),
        },
        abstract_within=frozenset({"apply"}),
    ),
    Requirement(
        "vllm.v1.worker.gpu.sample.logits_processor",
        "LogitsContext",
        fields=frozenset({"expanded_idx_mapping", "idx_mapping_np"}),
    ),
    Requirement(
        "vllm.v1.worker.gpu.sample.logits_processor",
        "LogitsProcRequestState",
        fields=frozenset({"device", "max_num_reqs"}),
    ),
)


def in_range(version: str) -> bool:
    """Whether ``version`` is in ``SUPPORTED_VLLM`` (local builds such as ``+cpu`` included)."""
    return SUPPORTED_VLLM.contains(Version(version).base_version, prereleases=True)


# -- the imported vLLM ------------------------------------------------------------------------
def _installed(req: Requirement) -> list[str]:
    try:
        mod = importlib.import_module(req.module)
    except ImportError:
        return [f"{req.module} is missing"]
    cls = getattr(mod, req.name, None)
    if cls is None:
        return [f"{req.what} is missing"]
    out: list[str] = []
    for method, names in req.params.items():
        fn = getattr(cls, method, None)
        if fn is None:
            out.append(f"{req.what}.{method} is missing")
            continue
        have = set(inspect.signature(fn).parameters)
        missing = [n for n in names if n not in have]
        if missing:
            out.append(f"{req.what}.{method} no longer takes {', '.join(missing)}")
    if req.abstract_within is not None:
        extra = set(getattr(cls, "__abstractmethods__", ())) - req.abstract_within
        if extra:
            out.append(f"{req.what} has new abstract methods {sorted(extra)}")
    for name in sorted(req.fields):
        fields = getattr(cls, "__dataclass_fields__", None)
        if not (hasattr(cls, name) or (fields is not None and name in fields)):
            out.append(f"{req.what} has no {name}")
    return out


def installed_problems() -> list[str]:
    """What of ``REQUIREMENTS`` the imported vLLM lacks (empty: the plugin can run)."""
    return [p for req in REQUIREMENTS for p in _installed(req)]


# -- a vLLM source tree, not imported -----------------------------------------------------------
def _module_files(root: Path, module: str) -> list[Path]:
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    if base.is_dir():
        return sorted(base.glob("*.py"))
    return []


def _find_class(files: Iterable[Path], name: str) -> ast.ClassDef | None:
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
    return None


def _decorated(fn: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id == name)
        or (isinstance(d, ast.Attribute) and d.attr == name)
        for d in fn.decorator_list
    )


def _source(root: Path, req: Requirement) -> list[str]:
    files = _module_files(root, req.module)
    if not files:
        return [f"{req.module} is missing"]
    cls = _find_class(files, req.name)
    if cls is None:
        return [f"{req.what} is missing"]
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    out: list[str] = []
    for method, names in req.params.items():
        fn = methods.get(method)
        if fn is None:
            out.append(f"{req.what}.{method} is missing")
            continue
        have = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
        missing = [n for n in names if n not in have]
        if missing and fn.args.vararg is None:
            out.append(f"{req.what}.{method} no longer takes {', '.join(missing)}")
    if req.abstract_within is not None:
        abstract = {m for m, fn in methods.items() if _decorated(fn, "abstractmethod")}
        new = sorted(abstract - req.abstract_within)
        if new:
            out.append(f"{req.what} has new abstract methods {new}")
    names_here = set(methods)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names_here.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names_here.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for name in sorted(req.fields - names_here):
        out.append(f"{req.what} has no {name}")
    return out


def source_problems(root: str | Path) -> list[str]:
    """What of ``REQUIREMENTS`` a vLLM source tree lacks; ``root`` holds the ``vllm`` package."""
    return [p for req in REQUIREMENTS for p in _source(Path(root), req)]
