"""The vLLM logits processors: batched precomputed SVD for every steered row.

vLLM 0.32 has two processor interfaces, and this module has one class for each, in the manner
of vLLM's own built-ins, over one shared ``SteeringEngine`` (vector store, request slots, kernel):

* ``SVDLogitsProcessorV1`` -- the V1 runner (CPU, and CUDA with the V1 runner): rows are
  persistent-batch indices, told through ``update_state``; state per row changes only there.
* ``SVDLogitsProcessorV2`` -- the V2 runner (the CUDA default): state per request index, written
  in ``add_request``, flushed to the device once in ``apply_staged_writes``; ``apply`` passes the
  device row -> request index mapping straight to the kernel (speculative-decoding rows included).

Per step, ``apply`` does no host sync on CUDA and builds no tensor: it returns at once when no
row is steered (decided from host state) and otherwise launches the kernel.

``SVDLogitsProcessor`` is the class the ``vllm.logits_processors`` entry point names. vLLM's V1
and V2 loaders each check it against their own interface, so it subclasses both; constructing it
returns the processor for the runner that asks (V1 passes ``(vllm_config, device,
is_pin_memory)``, V2 ``(vllm_config, req_states)``). Passed again with ``--logits-processors``,
the second instance for the same engine stays inert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .admission import validate_steering_params
from .steering_engine import SteeringEngine
from .vector_store import VectorStore

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

__all__ = ["SVDLogitsProcessor", "SVDLogitsProcessorV1", "SVDLogitsProcessorV2"]


class _SteeringProcessor:
    """What every class here shares: vLLM's admission check, the steering engine, its shutdown."""

    steering: SteeringEngine

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_steering_params(sampling_params.extra_args)

    @property
    def inert(self) -> bool:
        return self.steering.inert

    @property
    def store(self) -> VectorStore | None:
        return self.steering.store

    @property
    def runner(self) -> str:
        return self.steering.runner

    def __del__(self) -> None:
        steering = getattr(self, "steering", None)
        if steering is not None:
            steering.close()


class SVDLogitsProcessorV1(_SteeringProcessor, V1LogitsProcessor):
    """The V1 runner's processor (see the module doc)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        size = int(vllm_config.scheduler_config.max_num_seqs)
        self.steering = SteeringEngine(vllm_config, torch.device(device), size, "v1")

    def is_argmax_invariant(self) -> bool:
        return False  # steering changes the argmax; greedy requests must see it

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self.inert:
            return
        steering = self.steering
        for index in batch_update.removed:
            steering.release(index)
        for index, params, _, _ in batch_update.added:
            steering.set(index, params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.UNIDIRECTIONAL:
                steering.release(b)  # b is overwritten by a
            steering.slots.move(a, b, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.steering.slots.count == 0:
            return logits
        return self.steering.steer(logits, None)


class SVDLogitsProcessorV2(_SteeringProcessor, V2LogitsProcessor):
    """The V2 runner's processor (see the module doc)."""

    def __init__(self, vllm_config: VllmConfig, req_states: Any) -> None:
        device = torch.device(req_states.device)
        self.steering = SteeringEngine(vllm_config, device, int(req_states.max_num_reqs), "v2")

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return self.steering.set(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self.steering.slots.flush()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slots = self.steering.slots
        if slots.count == 0 or not slots.steered(ctx.idx_mapping_np):
            return logits
        return self.steering.steer(logits, ctx.expanded_idx_mapping)


class SVDLogitsProcessor(_SteeringProcessor, V1LogitsProcessor, V2LogitsProcessor):
    """The entry point's class: passes both loaders, builds the processor of the runner asking."""

    def __new__(cls, vllm_config: VllmConfig, *args: Any) -> Any:
        if len(args) == 2:
            return SVDLogitsProcessorV1(vllm_config, args[0], args[1])
        if len(args) == 1:
            return SVDLogitsProcessorV2(vllm_config, args[0])
        raise TypeError(
            "expected (vllm_config, device, is_pin_memory) or (vllm_config, req_states)"
        )

    # Never called: ``__new__`` returns a runner's processor. Defined so the class is concrete
    # for both ABCs.
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, *ctx: Any) -> torch.Tensor:
        raise NotImplementedError
