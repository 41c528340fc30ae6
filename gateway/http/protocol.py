"""uvicorn's HTTP protocol (httptools) with deadlines for each request's headers, and for the rest of a body
the gateway answered before reading it.

uvicorn closes a kept-alive connection that stays idle, but a connection that sends nothing, or starts a
request and never finishes its headers, it holds for ever (200 such sockets, one file descriptor each,
were all open after 20 s on 61e1da7). Here every connection must finish a request's headers within
`header_timeout_s` of connecting or of the request's first byte; past it the connection is closed. The
body has its own deadline where it is read (`gateway.http.reading`: 408).

A request refused before its body was read whole (a declared size past the limit, a key over its quota or
share, a JSON body with more values than one can hold) is answered at once; uvicorn then reads and drops
the rest of the body, so an honest client that finishes sending keeps its answer and its connection. But
every byte that arrives cancels uvicorn's keep-alive timer, and nothing else ends the wait: a client that
sent 200 kB of a declared 8 MB held its socket over 60 s after its 400. Here the rest of such a body must
arrive within `body_timeout_s` of the answer, else the connection is closed (a lingering close with a
deadline, not an immediate one: closing with the client's bytes unread resets the connection, and a
client still sending may lose the answer to the reset).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class DeadlineProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._rest_deadline: asyncio.TimerHandle | None = None
        self._message_complete = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        self._message_complete = False
        super().on_message_begin()
        self._arm()  # the next request on a kept-alive connection has the same deadline

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._message_complete = True
        self._cancel_rest_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._message_complete and self._rest_deadline is None and not self.transport.is_closing():
            self._rest_deadline = self.loop.call_later(self.body_timeout_s, self._close, "_rest_deadline")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._cancel_rest_deadline()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._close, "_header_deadline")

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _cancel_rest_deadline(self) -> None:
        if self._rest_deadline is not None:
            self._rest_deadline.cancel()
            self._rest_deadline = None

    def _close(self, deadline: str) -> None:
        setattr(self, deadline, None)
        if not self.transport.is_closing():
            self.transport.close()


def with_deadlines(header_timeout_s: float, body_timeout_s: float) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's `http=` with these deadlines."""
    return type(
        "DeadlineProtocol",
        (DeadlineProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
