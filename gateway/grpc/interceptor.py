"""The key check of every gRPC call, from its metadata, before its message is read: the scope its method
declares, and a key owing bytes of its byte budget held, then refused (its rate and in-flight bound are
taken by the handler); and the message's repeated fields counted on the wire before it is parsed, its size
spent from the key's byte budget."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import grpc
from fastapi import FastAPI

from gateway.auth.gate import KeyGate
from gateway.auth.keys import ANONYMOUS
from gateway.auth.pacing import MAX_HOLD_S
from gateway.auth.scopes import declared_scope
from gateway.errors import BadRequest, GatewayError
from gateway.grpc.calls import GRPC_CODES, authorization, refusal
from gateway.v2 import wire


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """The caller's key checked from the call's metadata before its message is read: a call without a
    valid key is refused before grpcio parses up to 8 MiB of protobuf for it. Each method declares its
    scope where it is defined (`requires`), as the HTTP routes do; a method that declares none is not
    one kdserve offers (the protocol's shared memory, repository control, statistics: Triton's). The
    method's handler checks the key again when it takes the key's quota (a hash and a compare)."""

    def __init__(self, app: FastAPI, servicer: type) -> None:
        self.app, self.servicer = app, servicer  # the servicer's methods declare their scopes

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        access = declared_scope(vars(self.servicer).get(method))
        if access is None:  # the generated base class would log a traceback and name its exception
            return refusal(grpc.StatusCode.UNIMPLEMENTED, f"kdserve does not offer {method[:64]}")
        key_id = ANONYMOUS
        if access.scope is not None:
            gate: KeyGate = self.app.state.key_gate
            try:
                key_id = gate.identify(authorization(handler_call_details.invocation_metadata), access.scope)
                await self._paid_for(gate, key_id)
            except GatewayError as exc:
                self.app.state.metrics.errors.labels(exc.kind).inc()
                return refusal(GRPC_CODES.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message, exc.headers)
        handler = await continuation(handler_call_details)
        if method == "ModelInfer" and handler is not None:
            spend = None if key_id == ANONYMOUS else partial(self.app.state.key_gate.spend_bytes, key_id)
            return _counted_before_parsing(handler, self.app.state.metrics, spend)
        return handler

    @staticmethod
    async def _paid_for(gate: KeyGate, key_id: str) -> None:
        """Return when `key_id` owes no bytes of its byte budget; a call that comes while it does waits for
        them to be paid, its message unread (the sender's stream stalls meanwhile), at most MAX_HOLD_S, then
        is refused (raises RateLimited). Two clients sending 7 MB calls kept the gateway a core busy in
        grpcio's receiving alone, whatever the answer (~3 ms of CPU per call)."""
        owed = gate.bytes_owed_s(key_id)
        if owed > 0:
            await asyncio.sleep(min(owed, MAX_HOLD_S))
            refused = gate.bytes_refusal(key_id)
            if refused is not None:
                raise refused


@dataclass(frozen=True)
class _Received:
    """What the deserializer hands the handler: the message's size on the wire, and the message parsed or
    why it was not."""

    size: int
    message: object = None
    too_many: str | None = None


def _counted_before_parsing(
    handler: grpc.RpcMethodHandler, metrics, spend: Callable[[int], None] | None
) -> grpc.RpcMethodHandler:
    """ModelInfer with its message's repeated fields counted on the wire before protobuf builds them, and its
    size spent from the caller's byte budget when the call ends (`spend`; None: an anonymous caller has none),
    as HTTP spends a body's after its request was admitted."""
    parse = handler.request_deserializer

    def deserialize(message: bytes) -> _Received:
        reason = wire.wire_refusal(message)
        if reason is not None:
            return _Received(len(message), too_many=reason)
        return _Received(len(message), parse(message))

    async def behaviour(received: _Received, context: grpc.aio.ServicerContext):
        try:
            if received.too_many is not None:
                metrics.errors.labels(BadRequest.kind).inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, received.too_many)
            return await handler.unary_unary(received.message, context)
        finally:
            if spend is not None:
                spend(received.size)

    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )
