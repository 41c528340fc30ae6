"""The embedded Triton server: the `tritonserver` binary shipped by nvidia-pytriton, run as a child process.

What it needs on a CPU-only machine (DESIGN.md): a backend directory holding the Python backend and
the stub built for the running interpreter; the venv's `bin/` first on PATH (the stub finds its
packages through the `pyvenv.cfg` beside `python3`, not through PYTHONPATH); LD_LIBRARY_PATH with
nvidia-pytriton's bundled libraries and the running interpreter's libpython.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.readiness import wait_until_ready

log = logging.getLogger("kdserve.triton")


def die_with_parent() -> list[str]:
    """A command prefix that has the kernel SIGTERM the child when the thread that started it ends: how a
    parent's death (an OOM kill, a SIGTERM with no cleanup) reaches a child in a session of its own.
    Triton shuts down on SIGTERM and takes its Python stubs with it. util-linux's `setpriv` arms it and
    execs the server (a `preexec_fn` doing the same can deadlock the forked child of a threaded parent);
    without it (not Linux), the server is started as it is."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: tritonserver would outlive a killed gateway")
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class TritonError(RuntimeError):
    """The embedded Triton could not be found, started or made ready."""


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise TritonError("nvidia-pytriton is not installed; install kdserve[serve]") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonError(f"no tritonserver binary under {root}")
    return root


def prepare_backend_dir(target: Path) -> Path:
    """Lay out `<target>/python/` with the Python backend and the stub for this interpreter."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [
        *(root / "backends" / "python").glob("*.so"),
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ]:
        destination = python_dir / source.name
        if not destination.exists():
            shutil.copy2(source, destination)
    return target


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    libs = Path(pytriton_root()).parent.parent / "nvidia_pytriton.libs"
    libpython_dir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(libs), libpython_dir, env.get("LD_LIBRARY_PATH", "")] if p)
    env.pop("PYTHONPATH", None)  # ignored by the stub anyway; keep the server's view of packages the venv's
    return env


class EmbeddedTriton:
    """Start, supervise (restart on crash) and stop one tritonserver process bound to `host`."""

    def __init__(
        self,
        repo: Path,
        ports: TritonPorts = TritonPorts(),
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        extra_args: list[str] | None = None,
        restart_on_crash: bool = True,
        max_restarts: int = 5,
    ):
        self.repo = Path(repo).resolve()
        self.ports, self.host = ports, host
        self.log_file = log_file
        self.extra_args = extra_args or []
        self.restart_on_crash, self.max_restarts = restart_on_crash, max_restarts
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._log = None  # the open log file of the running process, closed when it is replaced or stopped
        self._workdir = Path(tempfile.mkdtemp(prefix="kdserve-triton-"))
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        # The kernel sends the parent-death signal when the *thread* that forked the child ends, not the
        # process: every start and restart forks from this one thread, which lives until `stop`.
        self._spawner: ThreadPoolExecutor | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        backend_dir = prepare_backend_dir(self._workdir / "backends")
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # Export writes every config whole; auto-completion would only start one more Python stub per
            # model at each load (measured on the suite's repository: 48 stubs and ready in 5.9 s with it,
            # 24 and 2.2 s without).
            "--disable-auto-complete-config",
            *self.extra_args,
        ]

    def _spawn(self) -> None:
        if not (self.repo / "manifest.json").exists() and not any(self.repo.glob("*/config.pbtxt")):
            raise TritonError(f"{self.repo} is not a model repository (export one: python -m training export)")
        self._close_log()
        self._log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        output = self._log or subprocess.DEVNULL
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(1, thread_name_prefix="triton-spawner")
        self._process = self._spawner.submit(
            subprocess.Popen,
            [*die_with_parent(), *self.command()],
            env=server_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the supervisor, which stops it cleanly
        ).result()

    @staticmethod
    def _reap_group(process: subprocess.Popen) -> None:
        """Kill what is left of a server's process group once tritonserver itself is gone.

        Its Python-backend stubs (one process per model instance, each holding its model, ~200 MB
        here) outlive a tritonserver that crashed or was SIGKILLed, and a restart would add new ones
        beside them; they share the server's process group (its own session), so the group is reaped.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def start(self, timeout: float = 120.0) -> EmbeddedTriton:
        with self._lock:
            self._stopping.clear()
            self._spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:
            # The child runs in its own session, so nothing else would stop it: no orphan on a failed start.
            self.stop()
            raise
        if self.restart_on_crash and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
            self._watcher.start()
        log.info("triton ready on http %s grpc %s (pid %s)", self.http_url, self.grpc_url, self.pid)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        outcome = wait_until_ready(
            self.is_ready, lambda: self._process is not None and self._process.poll() is not None, timeout
        )
        if outcome == "exited":
            raise TritonError(
                f"tritonserver exited with code {self._process.returncode} during start-up"
                + (f"; see {self.log_file}" if self.log_file else "")
            )
        if outcome == "timeout":
            raise TritonError(f"tritonserver not ready after {timeout:.0f}s")

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is not None and process.poll() is not None and not self._stopping.is_set():
                if self.restarts >= self.max_restarts:
                    log.error("triton died (code %s); restart limit %d reached", process.returncode, self.max_restarts)
                    return
                self.restarts += 1
                log.warning("triton died (code %s); restart %d", process.returncode, self.restarts)
                self._reap_group(process)
                time.sleep(min(2.0**self.restarts / 4, 5.0))  # back off so a crash loop does not spin
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self._spawn()
                    self.wait_ready(120.0)
                except TritonError as exc:
                    log.error("triton restart failed: %s", exc)
            self._stopping.wait(0.5)

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # Triton unloads models and exits on SIGTERM
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process is not None:
                self._reap_group(process)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        if self._spawner is not None:  # the server is gone: its parent-death signal has nothing left to do
            self._spawner.shutdown()
            self._spawner = None
        self._close_log()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
