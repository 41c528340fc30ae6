#!/usr/bin/env bash
# Build the gateway image with podman from deploy/docker/gateway.Dockerfile and print its name.
#
# No container registry is reachable from the project's machines, so the Dockerfile's base (an official
# python image elsewhere) is made here: Debian bookworm with debootstrap, from the mirror apt uses here, with
# python3.11, its venv module (and python3-distutils, which debootstrap does not resolve for it) and
# libpython (Triton's Python-backend stub links it), imported under a
# local name and handed to the Dockerfile's PYTHON_IMAGE argument. Users with a registry keep building
# with Docker and the real base. The image is tagged with a hash of what goes into it and built only
# when no image of that tag exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="$PWD/deploy/podman/containers.conf"

BASE=localhost/kdserve-base/python:3.11-bookworm
if ! podman image exists "$BASE"; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  # The mirror apt uses here (or $DEBIAN_MIRROR): behind a proxy or with a local mirror, as apt-get works.
  mirror=$(bash deploy/podman/debian-mirror.sh)
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,libpython3.11,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >&2
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE" >&2
fi

hash=$( { cat deploy/docker/gateway.Dockerfile pyproject.toml README.md .dockerignore;
          find kdcontract gateway -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 cat; } \
        | sha256sum | cut -c1-12)
IMAGE=localhost/kdserve-gateway:$hash
if ! podman image exists "$IMAGE"; then
  # --network host with the host's CA bundle: pip in the build reaches PyPI the way the host does.
  podman build --format docker --network host -v /etc/ssl/certs:/etc/ssl/certs:ro \
    --build-arg PYTHON_IMAGE="$BASE" -f deploy/docker/gateway.Dockerfile -t "$IMAGE" . >&2
  podman image prune --force >&2  # untagged images (the build stage, older builds): only tagged ones stay
fi
echo "$IMAGE"
