"""The gateway image, built with podman from the repository's Dockerfile and run as production runs it:
read-only root, uid 10001, the model repository mounted read-only, API keys from the environment, its
HEALTHCHECK passing, answering classifications (REST and gRPC) exactly as the gateway on the host does,
and stopping cleanly on SIGTERM.

The image is built once per content hash (deploy/podman/image.sh); a fresh machine pays for the base
(debootstrap, ~1.5 min) and the build (~2 min) once."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.auth.keys import new_key
from gateway.process import free_port
from kdcontract.digits import digit_png_bytes
from tests.conftest import ROOT

PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "podman" / "containers.conf")}
HELD_OUT = [1500, 1600, 1700, 1750]
READY_WITHIN_S = 240  # Triton loads ~15 Python-backend models; generous for a machine 3x slower


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout, check=check
    )


def readable_by_anyone(repo: Path) -> Path:
    """pytest's temporary folders are root's alone (0700); the image runs as uid 10001, as in production,
    where the repository volume is readable by it."""
    for path in [repo, *repo.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return repo


def start_gateway_container(image: str, repo: Path, api_keys: str) -> tuple[str, str, str]:
    """The image run as in production: read-only root, the repository mounted read-only, API keys from
    the environment (as a Secret fills it), its embedded Triton on free loopback ports (host network: no
    port publishing needed on these machines). Returns its name, HTTP URL and gRPC address."""
    name = f"kdserve-test-{uuid.uuid4().hex[:8]}"
    port, grpc_port, http, grpc, metrics = free_port(), free_port(), free_port(), free_port(), free_port()
    podman(
        "run", "--detach", "--name", name, "--read-only", "--network", "host",
        "--volume", f"{repo}:/models:ro",
        "--env", f"KDSERVE_API_KEYS={api_keys}", "--env", f"KDSERVE_GRPC_PORT={grpc_port}",
        "--env", f"KDSERVE_PORT={port}", "--env", "KDSERVE_EMBEDDED_TRITON=true",
        "--env", f"KDSERVE_TRITON_URL=127.0.0.1:{http}",
        "--env", f"KDSERVE_TRITON_GRPC_PORT={grpc}", "--env", f"KDSERVE_TRITON_METRICS_PORT={metrics}",
        image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", podman("logs", name, check=False).stderr[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return name, url, f"127.0.0.1:{grpc_port}"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"not ready in {READY_WITHIN_S} s: {podman('logs', name, check=False).stderr[-3000:]}")


def test_the_image_serves_read_only_as_uid_10001_passes_its_healthcheck_and_stops_cleanly(
    gateway_image, tiny_repo, gateway
):
    key, entry = new_key("image-test", ["classify"], None, None)
    name, url, grpc_address = start_gateway_container(gateway_image, readable_by_anyone(tiny_repo), json.dumps([entry]))
    bearer = {"Authorization": f"Bearer {key}"}
    try:
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip() == "true"
        assert podman("exec", name, "touch", "/opt/kdserve/written", check=False).returncode != 0
        # Serving only: neither the training code nor the load tools nor torch are in the image.
        probe = "import importlib.util as u; print([m for m in ('torch', 'training', 'loadtest') if u.find_spec(m)])"
        assert podman("exec", name, "python", "-c", probe).stdout.strip() == "[]"

        assert podman("healthcheck", "run", name, check=False).returncode == 0

        # The container answers exactly what the gateway on the host answers for the same repository.
        files = [("images", (f"{i}.png", digit_png_bytes(i), "image/png")) for i in HELD_OUT]
        for model in ("student", "teacher", "ensemble"):
            params = {"model": model, "top_k": 10}
            assert httpx.post(f"{url}/v1/classify", params=params, files=files, timeout=60).status_code == 401
            served = httpx.post(f"{url}/v1/classify", params=params, files=files, headers=bearer, timeout=60)
            assert served.status_code == 200, served.text
            host = gateway.client.post("/v1/classify", params=params, files=files).json()["predictions"]
            for ours, theirs in zip(served.json()["predictions"], host, strict=True):
                expected = {p["label"]: p["probability"] for p in theirs["top_k"]}
                got = {p["label"]: p["probability"] for p in ours["top_k"]}
                assert got.keys() == expected.keys()
                np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-5)

        # The Open Inference Protocol over gRPC from the container, with the same key as metadata.
        with grpcclient.InferenceServerClient(grpc_address) as client:
            image_input = grpcclient.InferInput("IMAGE", [len(HELD_OUT), 1], "BYTES")
            image_input.set_data_from_numpy(np.array([[digit_png_bytes(i)] for i in HELD_OUT], dtype=object))
            result = client.infer("student", [image_input], headers={"authorization": f"Bearer {key}"})
            host = gateway.client.post("/v1/classify", params={"model": "student"}, files=files).json()
            top1 = [p["top_k"][0]["index"] for p in host["predictions"]]
            assert result.as_numpy("PROBABILITIES").argmax(-1).tolist() == top1

        podman("stop", "--time", "30", name, timeout=90)  # SIGTERM; SIGKILL only after 30 s
        state = podman("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout.split()
        assert state == ["0", "false"], podman("logs", name, check=False).stderr[-3000:]
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
