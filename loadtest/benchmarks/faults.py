"""`python -m loadtest faults`: hostile input and faults against the real gateway and Triton, with figures.

Each fault runs on its own Triton + gateway (they are killed, frozen and shut down). Clients keep
sending while the fault happens; every request is accounted for: an HTTP status, or *lost* (accepted
and then dropped without an answer). A connection refused after the gateway closed its socket was
never accepted, so it is counted as refused, not lost. Each figure has a target (what this machine
kind should meet); the table says whether it was met. The tests in `tests/test_faults.py` run the same
functions and assert the behaviour, with time bounds only where they are the product's contract.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

from gateway.process import serving
from kdcontract.digits import digit_png_bytes
from kdcontract.tables import markdown_table
from loadtest.benchmarks import neighbours
from loadtest.clients.measure import LOST, REFUSED, load_client, post_images, summarize


@dataclass
class FaultResult:
    name: str
    statuses: dict[str, int]
    figures: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)  # figure -> the most it should be on this kind

    def missed(self) -> list[str]:
        """Figures over their target (a figure of -1 never happened: missed too)."""
        return [k for k, bound in self.targets.items() if not 0 <= self.figures[k] <= bound]

    @property
    def lost(self) -> int:
        return self.statuses.get(LOST, 0)


@dataclass
class Traffic:
    """Requests sent by `clients` coroutines until stopped, each with its send time and outcome."""

    records: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, answered, status)

    def statuses(self, since: float = 0.0) -> dict[str, int]:
        return dict(Counter(status for sent, _, status in self.records if sent >= since))

    def first_ok_after(self, moment: float) -> float | None:
        done = [answered for sent, answered, status in self.records if sent >= moment and status == "200"]
        return min(done) if done else None

    def latencies_ms(self, status: str) -> list[float]:
        return [(answered - sent) * 1000 for sent, answered, s in self.records if s == status]


async def _send(client: aiohttp.ClientSession, url: str, form: list[tuple[str, bytes]], traffic: Traffic) -> None:
    sent = time.monotonic()
    status = await post_images(client, url, form)
    traffic.records.append((sent, time.monotonic(), status))


async def run_traffic(
    url: str,
    clients: int,
    images: int,
    seconds: float,
    events: list,
    routed: Callable[[], bool] = lambda: True,
    done: Callable[[Traffic], bool] = lambda _: False,
) -> Traffic:
    """Send for `seconds`, or until `done(traffic)`; `events` are (at_seconds, callable) run on the loop's
    executor meanwhile. `routed()` false: a load balancer took the gateway out of rotation, clients send
    nothing new."""
    traffic = Traffic()
    form = [(f"{i}.png", digit_png_bytes(1700 + i % 60)) for i in range(images)]
    start = time.monotonic()
    async with load_client(clients) as client:

        async def loop() -> None:
            while time.monotonic() - start < seconds and not done(traffic):
                if not routed():
                    await asyncio.sleep(0.01)
                    continue
                await _send(client, url, form, traffic)
                if traffic.records and traffic.records[-1][2] == REFUSED:
                    await asyncio.sleep(0.05)

        async def timeline() -> None:
            for at, action in events:
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                await asyncio.get_running_loop().run_in_executor(None, action)

        await asyncio.gather(timeline(), *(loop() for _ in range(clients)))
    return traffic


def hostile_inputs(gateway_url: str) -> list[dict]:
    """Inputs a hostile or careless client sends, each with the status it must get."""

    def png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    digit = digit_png_bytes(1700)
    cases = [
        ("decompression bomb (1-bit PNG, 20000x20000 header)", {"content": png(Image.new("1", (20000, 20000)))}, 413),
        ("truncated PNG", {"content": png(Image.new("RGB", (64, 64), (9, 9, 9)))[:70]}, 400),
        ("SVG", {"content": b'<svg xmlns="http://www.w3.org/2000/svg"/>', "ctype": "image/svg+xml"}, 415),
        ("text body", {"content": b"hello", "ctype": "text/plain"}, 415),
        ("empty body", {"content": b""}, 400),
        ("3,000 multipart parts", {"files": [("images", ("d.png", digit, "image/png"))] * 3000}, 400),
        ("40 MB body", {"content": b"\0" * (40 * 1024 * 1024)}, 413),
        ("CMYK JPEG", {"content": png(Image.new("CMYK", (32, 32), (0, 0, 0, 255)), "JPEG")}, 200),
        ("16-bit PNG", {"content": png(Image.fromarray(np.full((16, 16), 40000, np.uint16)))}, 200),
        ("GIF", {"content": png(Image.open(io.BytesIO(digit)).convert("P"), "GIF")}, 200),
        ("multipart top_k '²'", {"files": [("images", ("d.png", digit, "image/png"))], "data": {"top_k": "²"}}, 400),
        ("query top_k=abc", {"content": digit, "query": "&top_k=abc"}, 400),
        ("JSON with a number as image", {"json": {"images": [5]}}, 400),
        ("JSON base64 of text", {"json": {"images": ["aGVsbG8="]}}, 415),
        ("unknown model", {"content": digit, "query": "&model=resnet9000"}, 404),
    ]
    rows = []
    with httpx.Client(base_url=gateway_url, timeout=60) as client:
        for label, req, expected in cases:
            query = req.get("query", "")
            url = "/v1/classify?model=student" + query if "model=" not in query else "/v1/classify?" + query[1:]
            if "json" in req:
                resp = client.post(url, json=req["json"])
            elif "files" in req:
                resp = client.post(url, files=req["files"], data=req.get("data"))
            else:
                resp = client.post(url, content=req["content"], headers={"Content-Type": req.get("ctype", "image/png")})
            shaped = resp.status_code == 200 or (
                set(resp.json()) == {"error", "request_id"} and resp.headers.get("X-Request-ID")
            )
            rows.append({"input": label, "status": resp.status_code, "expected": expected, "error_shape": bool(shaped)})
    return rows


def triton_killed(repo: Path, clients: int = 8, give_up_s: float = 120.0, kill_at: float = 2.0) -> FaultResult:
    """Kill Triton under load; traffic goes on until answers are back for 2 s (or `give_up_s`)."""
    with serving(repo) as (triton, gateway):
        url = f"{gateway.url}/v1/classify?model=student"
        killed = {}

        def kill() -> None:
            killed["at"] = time.monotonic()
            os.kill(triton.pid, signal.SIGKILL)

        def recovered(traffic: Traffic) -> bool:
            back = traffic.first_ok_after(killed["at"]) if killed else None
            return back is not None and time.monotonic() - back > 2.0

        traffic = asyncio.run(run_traffic(url, clients, 1, kill_at + give_up_s, [(kill_at, kill)], done=recovered))
    back = traffic.first_ok_after(killed["at"])
    return FaultResult(
        "Triton killed (SIGKILL) under load",
        traffic.statuses(),
        {"recovery_s": round(back - killed["at"], 2) if back else -1.0},
        {"recovery_s": 10.0},
    )


def triton_stalled(repo: Path, deadline_s: float = 1.0, stall_s: float = 3.0, clients: int = 4) -> FaultResult:
    env = {"KDSERVE_TRITON_TIMEOUT_S": str(deadline_s)}
    with serving(repo, env) as (triton, gateway):
        url = f"{gateway.url}/v1/classify?model=student"
        moments = {}

        def stop() -> None:
            moments["stopped"] = time.monotonic()
            os.kill(triton.pid, signal.SIGSTOP)

        def cont() -> None:
            moments["continued"] = time.monotonic()
            os.kill(triton.pid, signal.SIGCONT)

        try:
            traffic = asyncio.run(run_traffic(url, clients, 1, stall_s + 5, [(1.0, stop), (1.0 + stall_s, cont)]))
        finally:
            os.kill(triton.pid, signal.SIGCONT)
    timeouts = traffic.latencies_ms("504")
    back = traffic.first_ok_after(moments["continued"])
    return FaultResult(
        f"Triton frozen (SIGSTOP) {stall_s:.0f} s, deadline {deadline_s:.1f} s",
        traffic.statuses(),
        {
            "max_504_ms": round(max(timeouts), 1) if timeouts else -1.0,
            "recovery_after_sigcont_s": round(back - moments["continued"], 2) if back else -1.0,
        },
        {"max_504_ms": 1000 * deadline_s + 500, "recovery_after_sigcont_s": 5.0},
    )


def overload(repo: Path, clients: int = 48, images: int = 32, seconds: float = 15.0) -> FaultResult:
    with serving(repo) as (_, gateway):
        traffic = asyncio.run(run_traffic(f"{gateway.url}/v1/classify?model=teacher", clients, images, seconds, []))
    answered = summarize(traffic.latencies_ms("200"))
    return FaultResult(
        f"overload: {clients} clients x {images}-image teacher batches",
        traffic.statuses(),
        {"answered_p99_ms": answered["p99_ms"], "answered": answered["requests"], "deadline_ms": 5000.0},
        {"answered_p99_ms": 5000.0},
    )


def sigterm_under_load(repo: Path, drain_s: float = 1.0, clients: int = 8) -> FaultResult:
    env = {"KDSERVE_DRAIN_S": str(drain_s)}
    with serving(repo, env) as (_, gateway):
        url = f"{gateway.url}/v1/classify?model=student"
        moments: dict[str, float] = {}

        def terminate() -> None:
            moments["signal"] = time.monotonic()
            gateway.proc.send_signal(signal.SIGTERM)
            with httpx.Client(timeout=2) as probe:  # readiness must fail first, while it still serves
                while time.monotonic() - moments["signal"] < drain_s:
                    try:
                        if probe.get(f"{gateway.url}/readyz").status_code == 503:
                            moments["unready"] = time.monotonic()
                            break
                    except httpx.HTTPError:
                        break
            gateway.proc.wait(30)
            moments["exited"] = time.monotonic()

        # Clients act as a load balancer does: once /readyz said 503, they send nothing new.
        traffic = asyncio.run(run_traffic(url, clients, 1, 6.0, [(2.0, terminate)], lambda: "unready" not in moments))
    after = traffic.statuses(since=moments["signal"])
    unready = moments.get("unready", moments["signal"] - 0.001) - moments["signal"]  # < 0: never seen unready
    return FaultResult(
        "gateway SIGTERM under load",
        traffic.statuses(),
        {
            "unready_after_ms": round(unready * 1000, 1),
            "exit_after_s": round(moments["exited"] - moments["signal"], 2),
            "answered_200_after_signal": after.get("200", 0),
        },
        {"unready_after_ms": 500.0, "exit_after_s": drain_s + 20.0},
    )


def markdown(hostile: list[dict], faults: list[FaultResult], machine: str) -> str:
    lines = [
        "# Hostile input and faults (`python -m loadtest faults`)",
        "",
        f"Machine: {machine}. Real gateway and embedded Triton; each fault on its own pair.",
        "",
        markdown_table(
            ["hostile input", "status", "expected", "error shape + request id"],
            [[r["input"], r["status"], r["expected"], "yes" if r["error_shape"] else "no"] for r in hostile],
            align="l r r c",
        ),
        "",
    ]
    rows = [
        [
            f.name,
            ", ".join(f"{k}: {v}" for k, v in sorted(f.statuses.items())),
            ", ".join(f"{k} {v}" for k, v in f.figures.items()),
            ", ".join(f"{k} ≤ {v:g}" for k, v in f.targets.items()),
            "yes" if not f.missed() else "no: " + ", ".join(f.missed()),
            f.lost,
        ]
        for f in faults
    ]
    lines.append(markdown_table(["fault", "statuses seen", "figures", "targets", "met", "lost"], rows, "l l l l c r"))
    lines += [
        "",
        "*lost*: accepted, then dropped without an answer; *refused*: a connection refused once the gateway had "
        "closed its socket (never accepted). In the SIGTERM row the clients stop sending once `/readyz` answers "
        "503, as a load balancer does; what they had in flight must all be answered.",
    ]
    return "\n".join(lines) + "\n"


def run_faults(repo: Path, out_dir: Path, machine: str) -> Path:
    with serving(repo) as (_, gateway):
        hostile = hostile_inputs(gateway.url)
    faults = [triton_killed(repo), triton_stalled(repo), overload(repo), sigterm_under_load(repo)]
    out_dir.mkdir(parents=True, exist_ok=True)
    print(neighbours.write(neighbours.noisy_neighbours(repo), out_dir, machine).read_text(), flush=True)
    payload = {"hostile": hostile, "faults": [asdict(f) for f in faults], "machine": machine}
    (out_dir / "faults.json").write_text(json.dumps(payload, indent=2) + "\n")
    path = out_dir / "faults.md"
    path.write_text(markdown(hostile, faults, machine))
    return path
