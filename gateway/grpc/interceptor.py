"""The key check of every gRPC call, from its metadata, before its message is read: the scope its method
declares, the key's rate and in-flight bound; and the message's repeated fields counted on the wire before it
is parsed."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from fastapi import FastAPI

from gateway.auth.gate import KeyGate
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
        if access.scope is not None:
            gate: KeyGate = self.app.state.key_gate
            try:
                gate.identify(authorization(handler_call_details.invocation_metadata), access.scope)
            except GatewayError as exc:
                self.app.state.metrics.errors.labels(exc.kind).inc()
                return refusal(GRPC_CODES.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message)
        handler = await continuation(handler_call_details)
        if method == "ModelInfer" and handler is not None:
            return _counted_before_parsing(handler, self.app.state.metrics)
        return handler


@dataclass(frozen=True)
class _TooMany:
    """What the deserializer hands the handler instead of a message it did not parse."""

    reason: str


def _counted_before_parsing(handler: grpc.RpcMethodHandler, metrics) -> grpc.RpcMethodHandler:
    """ModelInfer with its message's repeated fields counted on the wire before protobuf builds them."""
    parse = handler.request_deserializer

    def deserialize(message: bytes):
        reason = wire.wire_refusal(message)
        return _TooMany(reason) if reason is not None else parse(message)

    async def behaviour(request, context: grpc.aio.ServicerContext):
        if isinstance(request, _TooMany):
            metrics.errors.labels(BadRequest.kind).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await handler.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )
