"""Per-request bookkeeping as plain ASGI middleware: request id, in-flight gauge, latency and counts.

Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs the endpoint in
a task and streams the response through memory channels; replacing it took the gateway's p50 over
calling Triton directly from 4.5 to 2.1 ms here (`make bench`, one image, concurrency 1).
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.feedback.answers import CLIENT_ID, new_request_id
from gateway.telemetry.metrics import GatewayMetrics

REQUEST_ID_HEADER = b"x-request-id"


class RequestObserver:
    """Labels each request with route, model, arm and status.

    Routes write `request.state.model` and `request.state.arm`, which live in `scope["state"]`; the
    route template comes from `scope["route"]` once the router has matched. The request is over when
    its last body chunk is sent, so background tasks (shadow calls) do not count towards its latency.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), b"")
        rid = sent.decode("ascii") if CLIENT_ID.fullmatch(sent) else new_request_id()
        state = scope.setdefault("state", {})
        state.update(rid=rid, model="", arm="")
        start = time.perf_counter()
        status = 500
        done = False
        self.metrics.in_flight.inc()

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.metrics.in_flight.dec()
            path = getattr(scope.get("route"), "path", "unmatched")
            labels = (path, state.get("model", ""), state.get("arm", ""), str(status))
            self.metrics.child(self.metrics.request_seconds, *labels).observe(time.perf_counter() - start)
            self.metrics.child(self.metrics.requests, *labels).inc()

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode("latin-1"))]
                if getattr(scope["app"].state, "draining", False):
                    # Shutting down: no client may reuse this connection, so none sends a request on a
                    # keep-alive connection at the moment the server closes it (that request would be lost).
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_observed)
        finally:
            finish()  # an exception before the response: counted as the 500 it becomes
