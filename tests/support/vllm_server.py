"""The tests' vLLM server: the package's, plus the MRV2 lane's guard against a silent fallback."""

from __future__ import annotations

import os

from tests.support.child_servers import VLLMServer as _VLLMServer
from tests.support.child_servers import free_port, vllm_env

__all__ = ["VLLMServer", "free_port", "vllm_env"]


class VLLMServer(_VLLMServer):
    """Ready means the lane runs what it claims: on the MRV2 lane, the V2 runner and the
    interpreted Triton kernel (never the V1 runner or the torch kernel)."""

    def wait_ready(self, timeout: float = 240.0) -> None:
        super().wait_ready(timeout)
        if os.environ.get("SVD_TEST_MRV2") == "1":
            log = self.child.log_tail(1 << 22)
            assert "Using V2 Model Runner" in log, "the MRV2 lane's server runs the V1 runner"
            assert "v2 runner, triton (interpreted) kernel" in log, "no interpreted Triton kernel"
