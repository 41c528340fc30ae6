"""The gRPC server beside uvicorn on the gateway's event loop: the servicer behind the key interceptor, with
handshake and idle deadlines."""

from __future__ import annotations

import grpc
from fastapi import FastAPI
from tritonclient.grpc import service_pb2_grpc

from gateway.errors import GatewayError
from gateway.grpc.interceptor import KeyInterceptor
from gateway.grpc.servicer import InferenceService


async def start_grpc(
    app: FastAPI, host: str, port: int, max_message_bytes: int, header_timeout_s: float
) -> grpc.aio.Server:
    """The gRPC server on `host:port`, started; the caller stops it (`await server.stop(grace)`)."""
    server = grpc.aio.server(
        interceptors=[KeyInterceptor(app, InferenceService)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second gateway on the same port fails to start instead of sharing it
            # A connection must finish its handshake within the header deadline, and is closed after five
            # idle minutes: a socket that connects and stalls holds nothing for long.
            ("grpc.server_handshake_timeout_ms", int(header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", 300_000),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise GatewayError(f"the gRPC port {host}:{port} cannot be bound ({exc}); set KDSERVE_GRPC_PORT") from exc
    if bound == 0:
        raise GatewayError(f"the gRPC port {host}:{port} cannot be bound; set KDSERVE_GRPC_PORT (0: no gRPC)")
    await server.start()
    return server
