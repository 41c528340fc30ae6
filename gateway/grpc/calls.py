"""What every gRPC call carries and answers: its one credential, and the status code a gateway error
maps to (a 503's or 429's `Retry-After` travels as trailing metadata `retry-after`)."""

from __future__ import annotations

import grpc

from gateway.auth.keys import credential

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    410: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def authorization(metadata) -> str | None:
    """The call's one `authorization` entry (two are refused, as over HTTP)."""
    return credential([value for key, value in metadata or () if key == "authorization"])


async def abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None
) -> None:
    """End the call with `code` and `message`; a `Retry-After` among `headers` goes as `retry-after` trailing
    metadata."""
    retry = (headers or {}).get("Retry-After")
    if retry is not None:
        context.set_trailing_metadata((("retry-after", retry),))
    await context.abort(code, message)


def refusal(code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None) -> grpc.RpcMethodHandler:
    """A handler that refuses the call without deserialising its message."""

    async def refuse(_request: bytes, context: grpc.aio.ServicerContext) -> None:
        await abort(context, code, message, headers)

    return grpc.unary_unary_rpc_method_handler(refuse)
