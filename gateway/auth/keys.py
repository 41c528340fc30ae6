"""API keys: who may call, with which scopes, how fast and how many at once.

A key is sent as `Authorization: Bearer <key>` (REST) or the same `authorization` metadata (gRPC). Only
its sha256 is configured, in `KDSERVE_API_KEYS` (JSON, e.g. filled from a Kubernetes Secret) or a file
(`KDSERVE_API_KEYS_FILE`, a mounted Secret, re-read when it changes so a key is revoked without a
restart). A presented key is hashed and compared with every configured hash in constant time; the key
itself is never stored, logged or used as a label: logs and metrics name the key's `id`.

Scopes: `classify` (inference, models, feedback, the experiment's state) and `admin` (changing the
experiment). Per key, a token-bucket rate (`rate_per_s`, `burst`) and a bound on requests in flight
(`max_in_flight`); past either, a 429 with `Retry-After`. Health, readiness, `/metrics` and the web
page's HTML stay open.

With no classify key configured, classification is open to anonymous callers, which the gateway allows
only when it listens on loopback (the demo, tests, a laptop) or with `KDSERVE_ALLOW_ANONYMOUS=true`: a
gateway on a network address with no keys refuses to start, and a keys file rewritten to such a set
later (a Secret rotated to `[]`, the last entry deleted) is refused the same way: the keys in use stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from gateway.errors import CallerRefused, GatewayError

log = logging.getLogger("kdserve.gateway")


Scope = Literal["classify", "admin"]


ANONYMOUS, INVALID = "anonymous", "invalid"  # the key label for no key, and for a key that is not configured


ADMIN_TOKEN_ID = "admin-token"  # KDSERVE_ADMIN_TOKEN_SHA256, kept working as an admin key


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="names the key in logs and metrics")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the key")
    scopes: list[Scope] = Field(default_factory=lambda: ["classify"], min_length=1)
    rate_per_s: float | None = Field(None, gt=0, description="sustained requests per second (unset: unlimited)")
    burst: int | None = Field(None, ge=1, description="requests allowed at once above the rate (default: 1 s of it)")
    max_in_flight: int | None = Field(
        None, ge=1, description="requests under way at once (unset: the gateway's default)"
    )
    bytes_per_s: float | None = Field(None, gt=0, description="request bytes per second (unset: the gateway's default)")
    revoked: bool = False

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, key_id: str) -> str:
        if key_id in (ANONYMOUS, INVALID):
            raise ValueError(f"{key_id!r} names callers without a valid key; choose another id")
        return key_id


KEY_LIST = TypeAdapter(list[ApiKey])


class Unauthorized(GatewayError):
    status_code, kind = 401, "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="kdserve"'})


class Forbidden(GatewayError):
    status_code, kind = 403, "forbidden"


class RateLimited(CallerRefused):
    kind = "rate_limited"


class TooManyInFlight(CallerRefused):
    kind = "too_many_in_flight"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def credential(values: list[str]) -> str | None:
    """The one credential a request carries (HTTP's `Authorization` headers, gRPC's `authorization`
    metadata): none, or exactly one. Two are refused: which one wins would differ between protocols."""
    if len(values) > 1:
        raise Unauthorized(f"{len(values)} authorization values; send one")
    return values[0] if values else None


def read_keys(text: bytes | str, source: str) -> list[ApiKey]:
    """Keys from JSON: a list of {id, sha256, scopes, rate_per_s, burst, max_in_flight, revoked}."""
    try:
        return KEY_LIST.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "keys"
        raise GatewayError(f"API keys in {source}: {where}: {first['msg']}") from exc


def new_key(
    key_id: str,
    scopes: list[str],
    rate_per_s: float | None,
    max_in_flight: int | None,
    bytes_per_s: float | None = None,
) -> tuple[str, dict]:
    """A fresh random key and the entry to configure for it (which holds only its hash)."""
    import secrets

    key = f"kds_{secrets.token_urlsafe(32)}"
    entry = ApiKey(
        id=key_id,
        sha256=hash_key(key),
        scopes=scopes,
        rate_per_s=rate_per_s,
        max_in_flight=max_in_flight,
        bytes_per_s=bytes_per_s,
    )
    return key, json.loads(entry.model_dump_json(exclude_none=True, exclude_defaults=False))
