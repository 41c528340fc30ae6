# syntax=docker/dockerfile:1
# The gateway image: the contract package and the gateway with the `serve` extra only (FastAPI, uvicorn,
# tritonclient, ONNX Runtime and the embedded Triton of nvidia-pytriton for machines without NVIDIA's
# Triton container); no training code, no load tools, no torch.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t kdserve-gateway:0.1.0 .
# Settings are KDSERVE_* variables (gateway/settings.py); the model repository is mounted at /models.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kdcontract ./kdcontract
COPY gateway ./gateway
RUN python -m venv /opt/kdserve \
 && /opt/kdserve/bin/pip install --upgrade pip \
 && /opt/kdserve/bin/pip install '.[serve]' \
 # The serving image must not carry torch (~5 GB): fail the build if a dependency pulled it in.
 && /opt/kdserve/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/kdserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KDSERVE_HOST=0.0.0.0 \
    KDSERVE_PORT=8080 \
    KDSERVE_REPO=/models \
    KDSERVE_TRITON_LOG=/tmp/triton.log \
    HOME=/tmp
COPY --from=build /opt/kdserve /opt/kdserve
RUN groupadd --gid 10001 kdserve && useradd --uid 10001 --gid kdserve --no-create-home --shell /usr/sbin/nologin kdserve
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('KDSERVE_PORT', '8080') + '/healthz', timeout=2)"]
CMD ["python", "-m", "gateway", "serve"]
