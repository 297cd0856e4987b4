# syntax=docker/dockerfile:1.7
# detserve image. GPU (default):  docker build -t detserve .
#                 CPU only:       docker build --build-arg VARIANT=cpu -t detserve:cpu .
# Stages: runtime-<variant> (OS + Python) -> builder (venv with every wheel) -> final (venv + models).
# The final stage gets the venv and the models only: no compilers, no pip cache, no apt lists.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

# --- runtimes: the only part that differs between the variants -------------------------------
FROM ${CUDA_IMAGE} AS runtime-gpu
ENV DEBIAN_FRONTEND=noninteractive
# Distribution packages follow the base image's pinned release; pinning each one breaks on every
# security update of the base.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

FROM ${CPU_IMAGE} AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# A stage name, not an image: hadolint cannot resolve the build arg.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime

# --- builder: resolves and installs every dependency into /opt/venv ---------------------------
FROM runtime AS builder
ARG VARIANT
# Keep in step with pyproject.toml (a test checks it). The CPU variant takes torch from the PyTorch
# CPU index, which saves the ~3 GB of CUDA wheels the PyPI build pulls in.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
RUN if [ "$VARIANT" = "cpu" ]; then \
      /opt/venv/bin/pip install --index-url "$CPU_TORCH_INDEX" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
COPY service ./service
# pip's compiled bytecode stays: the venv is read-only to the server user, and the forkserver (or,
# with worker_start_method = "spawn", every worker) imports torch, so it saves start-up time.
RUN /opt/venv/bin/pip install .

# --- final image ---------------------------------------------------------------------------------
FROM runtime AS final
ARG VARIANT
LABEL org.opencontainers.image.title="detserve" \
      org.opencontainers.image.description="RTMDet object-detection serving (TorchServe/KServe V2/gRPC/Label Studio)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.detserve.variant="${VARIANT}"

# /var/cache/detserve: backend = "auto" writes its ONNX exports and parity verdicts there, never into
# the (read-only) model store. Mount a volume or an emptyDir over it to keep exports across restarts.
RUN groupadd --system --gid 10001 detserve \
 && useradd --system --uid 10001 --gid detserve --home-dir /home/detserve --create-home \
      --shell /usr/sbin/nologin detserve \
 && mkdir -p /var/cache/detserve \
 && chown 10001:10001 /var/cache/detserve

COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/detserve
# Bundled models are the default store; mount a folder over /opt/detserve/models (or point
# DETSERVE_MODEL_STORE elsewhere) to serve other weights. Owned by root: the server only reads them.
COPY models ./models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    DETSERVE_MODEL_STORE=/opt/detserve/models \
    DETSERVE_CACHE_DIR=/var/cache/detserve

USER 10001:10001
# 8080 inference REST (TorchServe, KServe V2, Label Studio), 8081 management (bound to 127.0.0.1
# unless DETSERVE_MANAGEMENT_ADDRESS says otherwise), 8082 Prometheus metrics, 7070 gRPC.
EXPOSE 8080 8081 8082 7070

# No curl in the image: the venv's Python does the probe. Liveness only; readiness is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DETSERVE_INFERENCE_PORT', '8080'), timeout=4)"]

# detserve handles SIGTERM itself: stop accepting, drain for drain_timeout_s, then exit. tini is
# PID 1 so that processes orphaned inside the container are reaped: workers are children of the
# forkserver, and if it dies they are re-parented to PID 1, which detserve would never wait for
# (zombies until the pod restarts). tini forwards SIGTERM to detserve and exits with its status;
# TINI_SUBREAPER lets it work under another init too (`docker run --init`, compose's `init: true`).
STOPSIGNAL SIGTERM
ENV TINI_SUBREAPER=1
ENTRYPOINT ["tini", "--", "detserve"]
CMD ["serve"]
