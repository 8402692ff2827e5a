"""Code that runs inside vLLM, loaded through the package's entry points.

* ``plugin`` -- the ``vllm.general_plugins`` hook (frontend): stamps adapter name and version pin.
* ``admission`` -- per-request arguments and their checks at admission (frontend).
* ``processor`` -- the logits processor (engine core / GPU worker).
* ``kernel`` -- the batched steering kernel the processor runs (torch; Triton on CUDA).
* ``compat`` -- the vLLM releases supported and the interface checks that decide it.

Importing this package does not import vLLM; ``plugin`` and ``processor`` do.
"""
