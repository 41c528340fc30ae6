"""`python -m loadtest soak`: minutes of mixed traffic; memory, file descriptors and latency must stay flat.

Clients send a mix (the A/B route with sticky keys, student, teacher, gateway and Triton ensembles, the
cascade when served, 16-image batches, and a share of bad requests that must get their 4xx) to the real
gateway and embedded Triton. Every 5 s the gateway's and Triton's resident memory and the gateway's
open file descriptors are read from /proc; latency is summarised per minute. RSS growth is measured
from the end of the first minute (warm-up: pools, caches, first batches) to the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp

from gateway.process import serving
from kdcontract.digits import digit_png_bytes
from kdcontract.manifest import read_manifest
from kdcontract.names import CASCADE, ENSEMBLE, STUDENT, TEACHER, TRITON_ENSEMBLE, available
from kdcontract.tables import markdown_table
from loadtest.clients.measure import load_client, post_images, summarize

SAMPLE_S = 5.0
BAD = b"this is not an image"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def group_rss_mb(pgid: int) -> float:
    """Resident memory of a whole process group: tritonserver and its Python-backend stubs, which hold
    the ONNX Runtime sessions (the server process alone is a small part of what Triton uses)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/<pid>/stat: the process group
                total += rss_mb(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
    return total


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def traffic_mix(models: list[str]) -> itertools.cycle:
    """(query, images, expected status) in a fixed rotation: mostly single images, some batches, some bad."""
    mix = [("", 1, 200)] * 4 + [(f"model={m}", 1, 200) for m in models] + [("model=student", 16, 200)]
    mix += [("model=student", 0, 415), ("model=nope", 1, 404)]
    return itertools.cycle(mix)


async def _client(url: str, mix, stop: float, keys, log: list, client: aiohttp.ClientSession) -> None:
    digits = itertools.cycle([digit_png_bytes(i) for i in range(1700, 1760)])
    while time.monotonic() < stop:
        query, images, expected = next(mix)
        form = [(f"{i}.png", next(digits) if images else BAD) for i in range(max(images, 1))]
        sent = time.monotonic()
        status = await post_images(client, f"{url}/v1/classify?{query}", form, {"X-Client-Key": next(keys)})
        log.append((sent, time.monotonic(), int(status) if status.isdigit() else -1, expected))  # -1: lost


async def _soak(url: str, models: list[str], seconds: float, clients: int, pids: dict[str, int]) -> dict:
    log: list[tuple[float, float, int, int]] = []
    samples: list[dict] = []
    start = time.monotonic()
    stop = start + seconds

    async def sampler() -> None:
        while time.monotonic() < stop:
            samples.append(
                {
                    "t": round(time.monotonic() - start, 1),
                    "gateway_rss_mb": round(rss_mb(pids["gateway"]), 1),
                    "triton_rss_mb": round(group_rss_mb(pids["triton"]), 1),
                    "gateway_fds": open_fds(pids["gateway"]),
                }
            )
            await asyncio.sleep(SAMPLE_S)

    await asyncio.gather(sampler(), mixed_traffic(url, models, stop, clients, log))
    return {"log": log, "samples": samples, "start": start}


def traffic_models(repo: Path) -> list[str]:
    """The `?model=` values the mix names explicitly for `repo` (the cascade only where it is served)."""
    manifest = read_manifest(repo)
    return available(manifest, (STUDENT, TEACHER, ENSEMBLE, TRITON_ENSEMBLE, CASCADE))


async def mixed_traffic(
    url: str, models: list[str], stop: float, clients: int, log: list, users_per_client: int = 1
) -> None:
    """`clients` coroutines send `traffic_mix(models)` until `stop` (monotonic), appending to `log`
    (sent, answered, status, expected status; status -1: lost). Each client speaks for
    `users_per_client` A/B users in turn (sticky keys: few users put whole users, not requests, in an
    arm, so the observed split only nears the configured one with many users)."""
    async with load_client(clients) as client:
        await asyncio.gather(
            *(_client(url, traffic_mix(models), stop, _keys(i, users_per_client), log, client) for i in range(clients))
        )


def _keys(client: int, users: int) -> itertools.cycle:
    return itertools.cycle([f"user-{client}-{user}" for user in range(users)])


def run_soak(repo: Path, minutes: float, clients: int = 8) -> dict:
    models = traffic_models(repo)
    with serving(repo, {"KDSERVE_SHADOW_FRACTION": "0.1"}) as (triton, gateway):
        pids = {"gateway": gateway.proc.pid, "triton": triton.pid}
        raw = asyncio.run(_soak(gateway.url, models, minutes * 60, clients, pids))
    log, samples, start = raw["log"], raw["samples"], raw["start"]
    outcomes = Counter("lost" if s < 0 else ("expected" if s == e else f"unexpected {s}") for _, _, s, e in log)
    per_minute = []
    for minute in range(int(minutes)):
        window = [
            (b - a) * 1000 for a, b, s, e in log if s == e == 200 and minute * 60 <= a - start < (minute + 1) * 60
        ]
        per_minute.append({"minute": minute + 1, **summarize(window)})
    warm = next((s for s in samples if s["t"] >= 60), samples[0])
    last = samples[-1]
    return {
        "minutes": minutes,
        "clients": clients,
        "requests": len(log),
        "outcomes": dict(outcomes),
        "errors": sum(n for k, n in outcomes.items() if k != "expected"),
        "gateway_rss_growth": round(last["gateway_rss_mb"] / warm["gateway_rss_mb"] - 1, 4),
        "triton_rss_growth": round(last["triton_rss_mb"] / warm["triton_rss_mb"] - 1, 4),
        "gateway_fds": [warm["gateway_fds"], last["gateway_fds"]],
        "per_minute": per_minute,
        "samples": samples,
    }


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(2, 1, figsize=(8, 6), dpi=110, sharex=False)
    t = [s["t"] / 60 for s in results["samples"]]
    mem.plot(t, [s["gateway_rss_mb"] for s in results["samples"]], label="gateway RSS (MB)")
    mem.plot(t, [s["triton_rss_mb"] for s in results["samples"]], label="Triton RSS: server + backend stubs (MB)")
    mem.set_xlabel("minutes")
    mem.legend()
    mem.grid(alpha=0.3)
    minutes = [m["minute"] for m in results["per_minute"]]
    lat.plot(minutes, [m["p50_ms"] for m in results["per_minute"]], marker="o", label="p50 ms")
    lat.plot(minutes, [m["p99_ms"] for m in results["per_minute"]], marker="o", label="p99 ms")
    lat.set_xlabel("minute")
    lat.legend()
    lat.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict, machine: str) -> str:
    lines = [
        f"# Soak: {results['minutes']:.0f} minutes of mixed traffic (`make soak`)",
        "",
        f"Machine: {machine}. {results['clients']} clients; {results['requests']:,} requests; outcomes "
        f"{results['outcomes']} (expected = the status that request must get, 4xx included); **errors "
        f"{results['errors']}**.",
        "",
        f"- gateway RSS growth after the first minute: **{results['gateway_rss_growth']:+.2%}**; Triton (server "
        f"and its Python-backend stubs) {results['triton_rss_growth']:+.2%}",
        f"- gateway open file descriptors: {results['gateway_fds'][0]} -> {results['gateway_fds'][1]}",
        "",
        markdown_table(
            ["minute", "requests (200)", "p50 ms", "p99 ms", "max ms"],
            [[m["minute"], m["requests"], m["p50_ms"], m["p99_ms"], m["max_ms"]] for m in results["per_minute"]],
            align="r r r r r",
        ),
    ]
    lines += ["", "![memory and latency over the soak](soak.png)"]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path, machine: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out_dir / "soak.png")
    path = out_dir / "soak.md"
    path.write_text(markdown(results, machine))
    return path
