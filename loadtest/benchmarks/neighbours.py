"""`make faults`, noisy neighbours: one key attacks the gateway while a second key's calls are measured.

For each hostile input of the review of the live endpoints (issue 34), one key (`hostile`) sends it for a
bounded time while a second key (`neighbour`) classifies one image at a time and a probe reads
`/healthz`, both at concurrency 1. The same calls are measured with no attack first, in the same run, on
the same gateway and Triton. What must hold: the neighbour is never refused, its classify p99 stays
within 3x of the quiet p99 (10x under the two floods, whose own clients share the machine's cores),
`/healthz` p99 under 100 ms, the gateway's memory under its Kubernetes limit (1 GiB), and no 5xx from
anyone. Every attack is bounded in count and time, and every request goes to this machine's loopback.

The attack runs in a process of its own, as a hostile caller is a program of its own: sharing the
measuring client's event loop, the attacker's 100 connections delayed the neighbour's own client, which
then reported the delay as the gateway's (the 64-image flood: neighbour p50 226 ms with the attack in
the measuring process, 9 ms with it in its own, while Triton's statistics gave the student the same
0.2-0.6 ms of queueing both ways). It shares this machine's two cores with the gateway, Triton and the
measuring client at normal priority (and in the same session, so in the same scheduling group as the
gateway): what it costs the machine to send counts against the gateway, as the issue's targets assume.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import multiprocessing
import secrets
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2

from gateway.process import serving
from kdcontract.digits import digit_png_bytes
from kdcontract.tables import markdown_table
from loadtest.clients.measure import summarize

ATTACK_S = 10.0  # each attack's length; the neighbour is measured over the same window
# Between one neighbour call and its next: ~600 classifies per window, so a p99 is the 6th-slowest call, not
# the 2nd (6 s windows at 20 ms put the same attack at x2.5 in one run and x5.0 in the next).
PAUSE_S = 0.01
QUIET_WINDOWS = 2  # the baseline every ratio divides by is measured over twice the window
MEMORY_LIMIT_MB = 1024.0  # the gateway's memory limit in deploy/k8s
HEALTHZ_P99_MS = 100.0
P99_RATIO, FLOOD_P99_RATIO = 3.0, 10.0
FUTURE_ID = "ffffffffffff00000000000000000000"


def present_request_id() -> str:
    """An id as the gateway issues them (32 hex digits, the first 12 the issuing time in ms), issued now:
    feedback for it waits for an answer that may still be on its way."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def api_key(key_id: str) -> tuple[str, dict]:
    """A key and its entry for the keys file (only its sha256 is configured; see docs/protocols.md)."""
    key = f"kds_{secrets.token_urlsafe(32)}"
    return key, {"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest(), "scopes": ["classify"]}


@dataclass
class Stage:
    """One attack (or the quiet baseline) and what the neighbour saw meanwhile."""

    attack: str
    flood: bool = False
    attacker: dict[str, int] = field(default_factory=dict)  # status -> count
    neighbour: dict[str, int] = field(default_factory=dict)
    classify_p99_ms: float = 0.0
    healthz_p99_ms: float = 0.0
    peak_rss_mb: float = 0.0
    p99_ratio: float = 1.0

    def fivexx(self) -> int:
        return sum(n for s, n in (*self.attacker.items(), *self.neighbour.items()) if s.startswith("5"))

    def refused(self) -> int:
        return sum(n for s, n in self.neighbour.items() if s != "200")

    def calls(self) -> int:
        """The neighbour's classify calls measured (the p99 is taken over these)."""
        return sum(n for s, n in self.neighbour.items() if not s.startswith("healthz"))

    def missed(self) -> list[str]:
        bound = FLOOD_P99_RATIO if self.flood else P99_RATIO
        checks = {
            "neighbour refused": self.refused() == 0,
            f"classify p99 > {bound:g}x quiet": self.p99_ratio <= bound,
            f"/healthz p99 > {HEALTHZ_P99_MS:g} ms": self.healthz_p99_ms < HEALTHZ_P99_MS,
            f"memory > {MEMORY_LIMIT_MB:g} MB": self.peak_rss_mb < MEMORY_LIMIT_MB,
            "5xx": self.fivexx() == 0,
        }
        return [name for name, ok in checks.items() if not ok]


@dataclass
class Target:
    """What an attack needs to know of the gateway (sent to the attacking process), and its answers."""

    url: str
    port: int
    grpc_url: str
    hostile: str
    neighbour: str
    keys_file: Path
    image_size: int
    statuses: Counter = field(default_factory=Counter)

    def as_hostile(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.hostile}"}


Attack = Callable[[aiohttp.ClientSession, Target, float], Awaitable[None]]


async def _repeat(clients: int, until: float, send: Callable[[], Awaitable[str]], target: Target) -> None:
    async def one() -> None:
        while time.monotonic() < until:
            try:
                target.statuses[await send()] += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                target.statuses["closed"] += 1  # the gateway closed the connection: its answer to this input
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(clients)))


def _http(session: aiohttp.ClientSession, target: Target, method: str, path: str, headers=None, **kwargs):
    """A function sending one hostile request; its status as text."""

    async def send() -> str:
        sent = target.as_hostile() | (headers or {})
        async with session.request(method, target.url + path, headers=sent, **kwargs) as resp:
            await resp.read()
            return str(resp.status)

    return send


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


async def future_feedback(session, target, until) -> None:
    body = {"request_id": FUTURE_ID, "label": "0"}
    await _repeat(8, until, _http(session, target, "POST", "/v1/feedback", json=body), target)


async def feedback_batch(session, target, until) -> None:
    body = json.dumps([{"request_id": present_request_id(), "label": "1"} for _ in range(1000)])
    send = _http(session, target, "POST", "/v1/feedback", data=body, headers={"Content-Type": "application/json"})
    await _repeat(4, until, send, target)


async def json_8mb(session, target, until) -> None:
    body = b'{"images": [' + b",".join([b"0"] * 4_000_000) + b"]}"
    send = _http(session, target, "POST", "/v1/classify", data=body, headers={"Content-Type": "application/json"})
    await _repeat(2, until, send, target)


async def experiment_reads(session, target, until) -> None:
    await _repeat(8, until, _http(session, target, "GET", "/v1/experiment"), target)


async def json_tensors(session, target, until) -> None:
    size = target.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (64, size, size, 3)).ravel().tolist()
    body = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [64, size, size, 3], "data": pixels}]}
    await _repeat(4, until, _http(session, target, "POST", "/v2/models/student/infer", json=body), target)


async def huge_pngs(session, target, until) -> None:
    big = _png(4096)

    def form() -> aiohttp.FormData:
        data = aiohttp.FormData()
        for i in range(16):
            data.add_field("images", big, filename=f"{i}.png", content_type="image/png")
        return data

    async def send() -> str:
        async with session.post(target.url + "/v1/classify", data=form(), headers=target.as_hostile()) as r:
            await r.read()
            return str(r.status)

    await _repeat(2, until, send, target)


async def grpc_million_inputs(session, target, until) -> None:
    bare = service_pb2.ModelInferRequest.InferInputTensor(name="IMAGE")
    body = service_pb2.ModelInferRequest(model_name="student", inputs=[bare] * 800_000).SerializeToString()
    metadata = (("authorization", f"Bearer {target.hostile}"),)
    async with grpc.aio.insecure_channel(target.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        async def send() -> str:
            try:
                await call(body, metadata=metadata, timeout=30)
                return "grpc:OK"
            except grpc.aio.AioRpcError as error:
                return f"grpc:{error.code().name}"

        await _repeat(2, until, send, target)


async def batch_flood(session, target, until) -> None:
    digit = digit_png_bytes(1700)

    async def send() -> str:
        data = aiohttp.FormData()
        for i in range(64):
            data.add_field("images", digit, filename=f"{i}.png", content_type="image/png")
        url = target.url + "/v1/classify?model=teacher"
        async with session.post(url, data=data, headers=target.as_hostile()) as resp:
            await resp.read()
            return str(resp.status)

    await _repeat(100, until, send, target)


async def slow_sockets(session, target, until) -> None:
    """200 sockets: a third never finish their headers, a third trickle a body declaring 8 MB, a third stay
    silent. Each is held until the gateway closes it or the attack ends."""
    loop = asyncio.get_running_loop()
    port = target.port
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + target.hostile.encode()

    async def hold(kind: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            if kind == 1:
                await loop.sock_sendall(sock, head + b"\r\n")
            elif kind == 2:
                await loop.sock_sendall(sock, head + b"\r\nContent-Type: image/png\r\nContent-Length: 8000000\r\n\r\n")
            while time.monotonic() < until:
                if kind == 2:
                    await loop.sock_sendall(sock, b"x")
                try:
                    if not await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=2.0):
                        target.statuses["closed by the gateway"] += 1
                        return
                    target.statuses["answered"] += 1
                    return
                except TimeoutError:
                    continue
            target.statuses["still open at the end"] += 1
        except OSError:
            target.statuses["closed by the gateway"] += 1
        finally:
            sock.close()

    await asyncio.gather(*(hold(i % 3) for i in range(200)))


async def probe_flood(session, target, until) -> None:
    async def send() -> str:
        async with session.get(target.url + "/readyz") as resp:
            await resp.read()
            return str(resp.status)

    await _repeat(32, until, send, target)


async def keys_emptied(session, target, until) -> None:
    """The keys file rewritten to `[]` (a Secret rotated to nothing): anonymous calls must stay refused and
    the neighbour's key must keep working; the file is put back at the end."""
    kept = target.keys_file.read_text()
    target.keys_file.write_text("[]")
    try:

        async def anonymous() -> str:
            async with session.post(
                target.url + "/v1/classify", data=digit_png_bytes(1500), headers={"Content-Type": "image/png"}
            ) as resp:
                await resp.read()
                return str(resp.status)

        await _repeat(2, until, anonymous, target)
    finally:
        target.keys_file.write_text(kept)


# (name, attack, flood): a flood's own clients share the machine's two cores with the gateway and Triton.
ATTACKS: list[tuple[str, Attack, bool]] = [
    ("feedback for ids from the future (8 clients)", future_feedback, False),
    ("1,000-item feedback batches (4 clients)", feedback_batch, False),
    ("8 MB JSON body of zeros (2 clients)", json_8mb, False),
    ("GET /v1/experiment (8 clients)", experiment_reads, False),
    ("JSON PIXELS tensors, 64 images (4 clients)", json_tensors, False),
    ("16 x 4096^2 PNGs in one request (2 clients)", huge_pngs, False),
    ("gRPC ModelInfer with 800k inputs (2 clients)", grpc_million_inputs, False),
    ("100 connections of 64-image teacher requests", batch_flood, True),
    ("200 slow sockets (headers, bodies, silence)", slow_sockets, False),
    ("readiness probe flood (32 clients)", probe_flood, True),
    ("keys file emptied; anonymous calls", keys_emptied, False),
]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _attack_in_process(target: Target, name: str, seconds: float, ready, go, answers) -> None:
    """The attacking process (its imports done): says `ready`, waits for `go`, runs the attack called `name`
    for `seconds`, and puts its answers (status -> count) on `answers`."""
    attack = {a.__name__: a for _, a, _ in ATTACKS}[name]

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            until = time.monotonic() + seconds
            await asyncio.wait_for(attack(session, target, until), timeout=seconds + 60)

    ready.set()
    go.wait()
    try:
        asyncio.run(run())
    finally:
        answers.put(dict(target.statuses))


async def _measure(target: Target, gateway_pid: int, seconds: float) -> tuple[list, list, Counter, float]:
    """The neighbour's classify and /healthz latencies over `seconds` (while an attack runs elsewhere)."""
    png = digit_png_bytes(1500)
    until = time.monotonic() + seconds
    classify_ms, healthz_ms, statuses, peak = [], [], Counter(), _rss_mb(gateway_pid)
    headers = {"Authorization": f"Bearer {target.neighbour}", "Content-Type": "image/png"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as mine:

        async def classify() -> None:
            while time.monotonic() < until:
                start = time.monotonic()
                async with mine.post(target.url + "/v1/classify?model=student", data=png, headers=headers) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
                classify_ms.append((time.monotonic() - start) * 1000)
                await asyncio.sleep(PAUSE_S)

        async def healthz() -> None:
            while time.monotonic() < until:
                start = time.monotonic()
                async with mine.get(target.url + "/healthz") as r:
                    await r.read()
                    statuses[f"healthz {r.status}"] += r.status != 200
                healthz_ms.append((time.monotonic() - start) * 1000)
                await asyncio.sleep(PAUSE_S)

        async def memory() -> None:
            nonlocal peak
            while time.monotonic() < until:
                peak = max(peak, _rss_mb(gateway_pid))
                await asyncio.sleep(0.1)

        await asyncio.gather(classify(), healthz(), memory())
    return classify_ms, healthz_ms, statuses, peak


def _stage(target: Target, gateway_pid: int, attack: Attack | None, seconds: float):
    """`_measure` while `attack` runs in a process of its own (started, and its imports done, first);
    the attacker's answers land in `target.statuses`."""
    if attack is None:
        return asyncio.run(_measure(target, gateway_pid, seconds))
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding threads and sockets
    ready, go, answers = spawn.Event(), spawn.Event(), spawn.Queue()
    attacker = spawn.Process(target=_attack_in_process, args=(target, attack.__name__, seconds, ready, go, answers))
    attacker.start()
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError(f"the attacking process for {attack.__name__} did not start")
        go.set()
        measured = asyncio.run(_measure(target, gateway_pid, seconds))
        target.statuses.update(answers.get(timeout=seconds + 120))
    finally:
        attacker.join(timeout=30)
        if attacker.is_alive():
            attacker.kill()
    return measured


def noisy_neighbours(repo: Path, seconds: float = ATTACK_S, attacks: list | None = None) -> list[Stage]:
    """The quiet baseline, then each attack, on one gateway (with keys and an answer store) and Triton."""
    (hostile, hostile_entry), (neighbour, neighbour_entry) = api_key("hostile"), api_key("neighbour")
    with tempfile.TemporaryDirectory(prefix="kdserve-neighbours-") as work:
        keys_file = Path(work) / "keys.json"
        keys_file.write_text(json.dumps([hostile_entry, neighbour_entry]))
        # Bound to every address, as a deployed gateway is (it is only ever called on loopback here): on a
        # loopback address a keys file emptied may open classification, since start-up would allow that.
        env = {
            "KDSERVE_HOST": "0.0.0.0",
            "KDSERVE_API_KEYS_FILE": str(keys_file),
            "KDSERVE_ANSWERS_DIR": str(Path(work) / "answers"),
        }
        with serving(repo, env) as (_, gateway):
            image_size = json.loads((Path(repo) / "manifest.json").read_text())["preprocessing"]["image_size"]
            target = Target(gateway.url, gateway.port, gateway.grpc_url, hostile, neighbour, keys_file, int(image_size))
            stages = []
            for name, attack, flood in [("quiet (no attack)", None, False), *(attacks or ATTACKS)]:
                target.statuses = Counter()
                window = seconds * (QUIET_WINDOWS if attack is None else 1)
                classify_ms, healthz_ms, statuses, peak = _stage(target, gateway.proc.pid, attack, window)
                stage = Stage(
                    name,
                    flood,
                    dict(target.statuses),
                    {k: v for k, v in statuses.items() if v},
                    summarize(classify_ms)["p99_ms"],
                    summarize(healthz_ms)["p99_ms"],
                    round(peak, 1),
                )
                stage.p99_ratio = round(stage.classify_p99_ms / stages[0].classify_p99_ms, 2) if stages else 1.0
                stages.append(stage)
                print(f"[neighbours] {name}: p99 {stage.classify_p99_ms} ms (x{stage.p99_ratio})", flush=True)
    return stages


def markdown(stages: list[Stage], machine: str) -> str:
    rows = [
        [
            s.attack,
            ", ".join(f"{k}: {v}" for k, v in sorted(s.attacker.items())) or "-",
            s.calls(),
            s.refused(),
            f"{s.classify_p99_ms:g} (x{s.p99_ratio:g})",
            f"{s.healthz_p99_ms:g}",
            f"{s.peak_rss_mb:g}",
            s.fivexx(),
            "yes" if not s.missed() else "no: " + ", ".join(s.missed()),
        ]
        for s in stages
    ]
    return "\n".join(
        [
            "# Noisy neighbours (`make faults`)",
            "",
            f"Machine: {machine}. One gateway with two API keys and its embedded Triton; each attack runs "
            f"{ATTACK_S:g} s from the `hostile` key, in a process of its own at normal CPU priority (sharing the "
            "two cores with the gateway and Triton), while the `neighbour` key classifies "
            f"one image at a time and a probe reads `/healthz` (concurrency 1 each, {PAUSE_S * 1000:g} ms apart), "
            f"then the next attack. The first row is the same measurement with no attack, over "
            f"{QUIET_WINDOWS * ATTACK_S:g} s. Targets: the neighbour never refused, its classify p99 within "
            f"{P99_RATIO:g}x of the quiet p99 ({FLOOD_P99_RATIO:g}x under the two floods, whose clients share the "
            f"cores), `/healthz` p99 under {HEALTHZ_P99_MS:g} ms, the gateway's resident memory under "
            f"{MEMORY_LIMIT_MB:g} MB (its Kubernetes limit), no 5xx.",
            "",
            markdown_table(
                [
                    "attack (hostile key)",
                    "attacker's answers",
                    "neighbour calls",
                    "refused",
                    "neighbour classify p99 ms",
                    "/healthz p99 ms",
                    "gateway peak RSS MB",
                    "5xx",
                    "met",
                ],
                rows,
                "l l r r r r r r l",
            ),
            "",
        ]
    )


def write(stages: list[Stage], out_dir: Path, machine: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "attack_s": ATTACK_S, "stages": [asdict(s) for s in stages]}
    (out_dir / "neighbours.json").write_text(json.dumps(payload, indent=2) + "\n")
    path = out_dir / "neighbours.md"
    path.write_text(markdown(stages, machine))
    return path
