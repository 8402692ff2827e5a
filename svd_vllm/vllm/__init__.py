"""Code that runs inside vLLM, loaded through the package's entry points.

* ``plugin`` -- the ``vllm.general_plugins`` hook (frontend): stamps adapter name and version pin.
* ``admission`` -- per-request arguments and their checks at admission (frontend).
* ``processor`` -- the logits processors, one class per runner interface (engine core / GPU
  worker), over ``steering_engine.SteeringEngine``: the engine's ``vector_store`` (host cache and
  device table of shifts), its ``request_slots`` (per request index) and the ``kernel``.
* ``kernel`` -- the batched steering kernel the processor runs (torch; ``_triton_steer`` on CUDA).
* ``compat`` -- the vLLM releases supported and the interface checks that decide it.

Importing this package does not import vLLM; ``plugin`` and ``processor`` do.
"""
