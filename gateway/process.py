"""`python -m gateway serve` as a child process: how the demo, the benchmarks and the tests run it."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from gateway.readiness import wait_until_ready
from gateway.triton.server import EmbeddedTriton, TritonPorts


def _outside_ephemeral_range() -> tuple[int, int] | None:
    """Unprivileged ports the kernel never hands out as an outgoing connection's source port."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    if low - 1 - 10_000 >= 1_000:
        return 10_000, low - 1
    if 65_535 - high >= 1_000:
        return high + 1, 65_535
    return None


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, for a server started next, chosen outside the kernel's ephemeral
    range: a port the kernel picks for port 0 can become a client socket's source port before the server
    binds it (seen in the suite: Triton's gRPC port 'already in use', taken by loopback HTTP traffic)."""
    span = _outside_ephemeral_range()
    for _ in range(200 if span else 0):
        port = random.randint(*span)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class GatewayStartError(RuntimeError):
    """The gateway exited during start-up or never became ready; the message carries its log."""


class GatewayProcess:
    """Start the gateway under uvicorn and wait until `ready_path` answers 200 (or it exits)."""

    def __init__(
        self,
        repo: Path,
        triton_url: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_path: str = "/healthz",
        timeout: float = 60.0,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Its own free gRPC port too (unless `env` names one), so gateways side by side never collide.
        self.grpc_port = int((env or {}).get("KDSERVE_GRPC_PORT") or free_port())
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        # Output goes to a file, not a pipe: a pipe nobody reads fills up and blocks a long-running gateway.
        descriptor, log_name = tempfile.mkstemp(prefix="kdserve-gateway-", suffix=".log")
        self.log_path = Path(log_name)
        with os.fdopen(descriptor, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--repo",
                    str(repo),
                    "--triton-url",
                    triton_url,
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                env={**os.environ, "KDSERVE_GRPC_PORT": str(self.grpc_port), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        outcome = wait_until_ready(
            lambda: answers(f"{self.url}{ready_path}"), lambda: self.proc.poll() is not None, timeout
        )
        if outcome == "exited":
            raise GatewayStartError(f"gateway exited during start-up: {self.log_path.read_text().strip()}")
        if outcome == "timeout":
            self.stop()
            raise GatewayStartError(f"gateway not answering {ready_path} after {timeout:.0f}s")
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextmanager
def serving(repo: Path, env: dict[str, str] | None = None) -> Iterator[tuple[EmbeddedTriton, GatewayProcess]]:
    """The embedded Triton and a gateway in front of it, for `repo`, on free loopback ports."""
    with EmbeddedTriton(repo, TritonPorts(free_port(), free_port(), free_port())) as triton:  # noqa: SIM117
        with GatewayProcess(repo, triton.http_url, env=env, ready_path="/readyz") as gateway:
            yield triton, gateway
