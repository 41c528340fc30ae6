"""The gateway's running parts are started in order on one exit stack and stopped in reverse: on
shutdown, and when a later part fails to start (nothing started before it is left running)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.app.factory import create_app
from gateway.errors import GatewayError
from gateway.settings import GatewaySettings
from gateway.triton.client import TritonClient


def _settings(repo, tmp_path, grpc_port: int) -> GatewaySettings:
    # No Triton is needed: nothing here classifies, and Triton's client connects on first use.
    return GatewaySettings(
        repo=repo,
        grpc_port=grpc_port,
        manifest_poll_s=0.05,
        answers_dir=tmp_path / "answers",
        capture_fraction=1.0,
        capture_dir=tmp_path / "capture",
    )


def _lifespan(app):
    return app.router.lifespan_context(app)


def test_a_part_that_fails_to_start_stops_every_part_started_before_it(tiny_repo, tmp_path, monkeypatch):
    closed = []
    close = TritonClient.close

    async def counting_close(self) -> None:
        closed.append(self)
        await close(self)

    monkeypatch.setattr(TritonClient, "close", counting_close)
    with socket.socket() as taken:  # the gRPC server, the last part, cannot bind its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = create_app(_settings(tiny_repo, tmp_path, taken.getsockname()[1]))

        async def start() -> None:
            async with _lifespan(app):
                pytest.fail("the gateway started on a port another process holds")

        with pytest.raises(GatewayError, match="gRPC port"):
            asyncio.run(start())
    state = app.state
    assert state.decode_pool._shutdown, "the decode pool was left running"
    assert state.feedback._pool._shutdown, "the feedback join's pool was left running"
    assert closed == [state.classifier.triton], "Triton's client was left open"
    assert state.figures._pool._shutdown, "the figures' thread was left running"


def test_parts_stop_in_reverse_order_of_their_start(tiny_repo, tmp_path):
    app = create_app(_settings(tiny_repo, tmp_path, 0))
    seen: list[str] = []

    async def run() -> None:
        async with _lifespan(app):
            state = app.state
            tasks = {t.get_coro().__qualname__: t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
            assert {"ManifestFollower.run", "AnswerStore.run", "Capture.run"} <= set(tasks), sorted(tasks)
            # What each part's stop does, observed as it happens: the decode pool shuts down before the
            # capture flushes its segment, which happens before the answers are flushed, before Triton's
            # client closes.
            for name, owner, method in (
                ("decode pool", state.decode_pool, "shutdown"),
                ("capture", state.capture, "flush"),
                ("answers", state.answers, "flush"),
                ("triton client", state.classifier.triton, "close"),
            ):
                original = getattr(owner, method)

                def spy(*args, _name=name, _original=original, **kwargs):
                    seen.append(_name)
                    return _original(*args, **kwargs)

                setattr(owner, method, spy)
        assert all(task.done() for task in tasks.values()), "a background task outlived the lifespan"

    asyncio.run(run())
    assert seen == ["decode pool", "capture", "answers", "triton client"]
