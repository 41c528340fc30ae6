"""The admin credential: a bearer token compared, in constant time, by its sha256 with the configured one.

Only the hash is configured (`KDSERVE_ADMIN_TOKEN_SHA256`), so the settings, the environment and the
logs never hold the token itself.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from gateway.errors import GatewayError


class Unauthorized(GatewayError):
    status_code, kind = 401, "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="kdserve"'})


class Forbidden(GatewayError):
    status_code, kind = 403, "forbidden"


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def require_admin(request: Request) -> None:
    """Raises unless the request carries the admin token; a gateway with none configured has no admin API."""
    expected = request.app.state.settings.admin_token_sha256
    if expected is None:
        raise Forbidden("the admin API is off: no admin credential is configured (KDSERVE_ADMIN_TOKEN_SHA256)")
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("an admin bearer token is required (Authorization: Bearer <token>)")
    if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), expected):
        raise Unauthorized("the bearer token is not the admin credential")
