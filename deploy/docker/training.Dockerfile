# syntax=docker/dockerfile:1
# The training image for the Jobs in deploy/k8s/training: the `train` extra with the pinned torch and
# torchvision (PyPI's Linux wheels, which run on CPU and on NVIDIA GPUs).
#   docker build -f deploy/docker/training.Dockerfile -t kdserve-training:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kdcontract ./kdcontract
COPY training ./training
RUN python -m venv /opt/kdserve \
 && /opt/kdserve/bin/pip install --upgrade pip \
 && /opt/kdserve/bin/pip install torch==2.14.1 torchvision==0.29.1 'numpy<2' \
 && /opt/kdserve/bin/pip install '.[train]'

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/kdserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/kdserve /opt/kdserve
RUN groupadd --gid 10001 kdserve && useradd --uid 10001 --gid kdserve --no-create-home --shell /usr/sbin/nologin kdserve
USER 10001:10001
WORKDIR /tmp
CMD ["python", "-m", "training", "--help"]
