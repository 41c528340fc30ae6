"""Every HTTP request checked against the key gate before it is handled (plain ASGI), by the scope its
route declares."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.routing import Match

from gateway.auth.gate import KeyGate
from gateway.auth.keys import ANONYMOUS, Forbidden, credential
from gateway.auth.pacing import RefusalPacing
from gateway.auth.scopes import Access, declared_scope
from gateway.errors import CallerRefused, GatewayError
from gateway.http.errors import error_response
from gateway.http.reading import declared_length
from gateway.http.route_table import served_routes

log = logging.getLogger("kdserve.gateway")


UNMATCHED = Access("classify")  # no route: a caller without a key learns nothing, not even a 404


ROUTE_CACHE_SIZE = 4096  # (method, path) pairs whose route is remembered; paths are the caller's choice


class KeyMiddleware:
    """Every HTTP request checked against the key gate before it is handled (plain ASGI, like the
    observer): the route is matched as the router will match it, and its declared scope applies. A
    refusal is answered in the route's error shape and counted like any error."""

    def __init__(self, app, gate: KeyGate, pacing: RefusalPacing, on_error) -> None:
        self.app, self.gate, self.pacing, self.on_error = app, gate, pacing, on_error
        self._access: dict[tuple[str, str], Access | None] = {}

    def access(self, scope) -> Access | None:
        """The declared access of the route the router will choose (a full match first, else the first
        partial one: another method, 405); UNMATCHED for no route; None for a route that declares none."""
        key = (scope["method"], scope["path"])
        if key in self._access:
            return self._access[key]
        chosen = None
        for route in served_routes(scope["app"].router.routes):
            match, _ = route.matches(scope)
            if match == Match.FULL:
                chosen = route
                break
            if match == Match.PARTIAL and chosen is None:
                chosen = route
        access = UNMATCHED if chosen is None else declared_scope(chosen)
        if access is None:
            log.error("route %s %s declares no scope: refused to everyone", scope["method"], scope["path"])
        if len(self._access) >= ROUTE_CACHE_SIZE:
            self._access.clear()
        self._access[key] = access
        return access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access = self.access(scope)
        if access is not None and access.scope is None:
            await self.app(scope, receive, send)
            return
        try:
            if access is None:
                raise Forbidden(
                    f"route {scope['path'][:64]} declares no scope: refused (see gateway.auth.scopes.requires)"
                )
            authorization = credential([v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"])
            admitted = self.gate.admit(authorization, access.scope)
            key_id = admitted.__enter__()
        except GatewayError as exc:
            self.on_error(exc.kind)
            if isinstance(exc, CallerRefused):
                await self.pacing.answer_when_due(exc)
            response = error_response(Request(scope), exc.status_code, exc.kind, exc.message, exc.headers)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["key_id"] = key_id  # request.state.key_id: admission's caller
        try:
            await self.app(scope, self._counting(key_id, scope, receive), send)
        finally:
            admitted.__exit__(None, None, None)

    def _counting(self, key_id: str, scope, receive):
        """`receive`, with the request's bytes spent from its key's byte budget: the declared length at once
        (the gateway reads or drops all of it, whatever it answers), else each chunk as it arrives."""
        if key_id == ANONYMOUS:
            return receive
        declared = declared_length(
            next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
        )
        if declared is not None:
            self.gate.spend_bytes(key_id, declared)
            return receive

        async def counted():
            message = await receive()
            self.gate.spend_bytes(key_id, len(message.get("body", b"")))
            return message

        return counted
