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
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.requests import Request
from starlette.routing import Match

from gateway.errors import GatewayError, error_response
from gateway.files import file_stamp
from gateway.metrics import GatewayMetrics
from gateway.route_table import served_routes

log = logging.getLogger("kdserve.gateway")
Scope = Literal["classify", "admin"]
T = TypeVar("T")
ANONYMOUS, INVALID = "anonymous", "invalid"  # the key label for no key, and for a key that is not configured
ADMIN_TOKEN_ID = "admin-token"  # KDSERVE_ADMIN_TOKEN_SHA256, kept working as an admin key
FILE_CHECK_S = 1.0  # how often the keys file's modification time is looked at, at most


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="names the key in logs and metrics")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the key")
    scopes: list[Scope] = Field(default_factory=lambda: ["classify"], min_length=1)
    rate_per_s: float | None = Field(None, gt=0, description="sustained requests per second (unset: unlimited)")
    burst: int | None = Field(None, ge=1, description="requests allowed at once above the rate (default: 1 s of it)")
    max_in_flight: int | None = Field(None, ge=1, description="requests under way at once (unset: unlimited)")
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


class RateLimited(GatewayError):
    status_code, kind = 429, "rate_limited"


class TooManyInFlight(GatewayError):
    status_code, kind = 429, "too_many_in_flight"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class _Quota:
    """One key's token bucket (shared by every request with the key)."""

    def __init__(self, key: ApiKey, default_max_in_flight: int | None):
        self.rate, self.max_in_flight = key.rate_per_s, key.max_in_flight or default_max_in_flight
        self.capacity = float(key.burst or max(1, math.ceil(key.rate_per_s or 1)))
        self.tokens, self.updated = self.capacity, time.monotonic()

    def take(self) -> float | None:
        """None when the request may go; else the seconds until a token is there."""
        if self.rate is None:
            return None
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


class KeyGate:
    def __init__(
        self,
        keys: list[ApiKey],
        keys_file: Path | None,
        admin_token_sha256: str | None,
        allow_anonymous: bool,
        metrics: GatewayMetrics,
        host: str = "127.0.0.1",
        default_max_in_flight: int | None = None,
    ):
        """Raises GatewayError for keys that start-up must refuse (see `_check_open`)."""
        self._configured, self.keys_file, self.metrics = list(keys), keys_file, metrics
        if admin_token_sha256 is not None:
            self._configured.append(ApiKey(id=ADMIN_TOKEN_ID, sha256=admin_token_sha256, scopes=["admin"]))
        self.allow_anonymous, self.host = allow_anonymous, host
        self.default_max_in_flight = default_max_in_flight  # for keys that set no max_in_flight of their own
        self._file_state: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._keys: list[ApiKey] = []
        self._quotas: dict[str, _Quota] = {}
        # Requests under way per key id, apart from the quotas: a key revoked, removed or changed while its
        # requests run keeps their count, so it never goes negative or forgets one.
        self._in_flight: dict[str, int] = {}
        self._load(self._read_file())

    # -- configuration ------------------------------------------------------------------------------
    def _read_file(self) -> list[ApiKey]:
        if self.keys_file is None:
            return []
        try:
            self._file_state = file_stamp(self.keys_file)
            return read_keys(self.keys_file.read_bytes(), str(self.keys_file))
        except OSError as exc:
            raise GatewayError(f"the API keys file {self.keys_file} cannot be read ({exc.strerror})") from exc

    def _load(self, from_file: list[ApiKey]) -> None:
        keys = self._configured + from_file
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids):
            raise GatewayError(f"API key ids must be unique, got {sorted(ids)}")
        self._check_open(keys)
        old, self._keys, self._quotas = self._quotas, keys, {}
        for key in keys:
            if key.revoked:
                continue
            quota, before = _Quota(key, self.default_max_in_flight), old.get(key.id)
            if before is not None and (before.rate, before.capacity) == (quota.rate, quota.capacity):
                quota.tokens, quota.updated = before.tokens, before.updated  # an unchanged bucket keeps its level
            self._quotas[key.id] = quota
        for key in keys:
            self.metrics.key_requests.labels(key.id, "accepted")  # every key's series exists from the start

    def _refresh(self) -> None:
        """Re-read the keys file when it changed (at most once a second); a broken file keeps the old keys."""
        now = time.monotonic()
        if self.keys_file is None or now - self._checked < FILE_CHECK_S:
            return
        self._checked = now
        try:
            if file_stamp(self.keys_file) == self._file_state:
                return
            self._load(self._read_file())
        except GatewayError as exc:
            self.metrics.errors.labels("keys_file").inc()
            log.warning("keeping the API keys in use: %s", exc.message)
        except OSError:
            pass

    def classify_open(self) -> bool:
        """Classification without a key: no classify key is configured."""
        return _classify_open(self._keys)

    def _check_open(self, keys: list[ApiKey]) -> None:
        """The one rule, at start-up and at every reload: no open classification on a network address
        unless it was asked for."""
        if _classify_open(keys) and not (self.allow_anonymous or is_loopback(self.host)):
            raise GatewayError(
                f"the gateway listens on {self.host} and no API key is configured: anyone who reaches the port "
                "could classify. Set KDSERVE_API_KEYS or KDSERVE_API_KEYS_FILE (python -m gateway keys new), or "
                "KDSERVE_ALLOW_ANONYMOUS=true to serve without keys"
            )

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)

    # -- the check ----------------------------------------------------------------------------------
    def _identify(self, token: str) -> ApiKey | None:
        digest = hash_key(token).encode()
        found = None
        for key in self._keys:  # every hash compared, in constant time: no early exit
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        return found

    def _refuse(self, label: str, error: GatewayError) -> GatewayError:
        self.metrics.key_requests.labels(label, error.kind).inc()
        return error

    def _caller(self, token: str | None, scope: Scope) -> ApiKey | None:
        """The key presented, if it may use `scope`; None for an anonymous caller of open classification.
        Raises 401 or 403 (counted). Call under the lock."""
        if scope == "admin" and not any("admin" in k.scopes and not k.revoked for k in self._keys):
            raise self._refuse(
                ANONYMOUS if token is None else INVALID,
                Forbidden("the admin API is off: no admin key is configured (KDSERVE_API_KEYS, scope admin)"),
            )
        if token is None:
            if scope == "classify" and self.classify_open():
                return None
            raise self._refuse(ANONYMOUS, Unauthorized("an API key is required (Authorization: Bearer <key>)"))
        key = self._identify(token)
        if key is None or key.revoked:
            raise self._refuse(INVALID, Unauthorized("the API key is not valid (unknown or revoked)"))
        if scope not in key.scopes:
            raise self._refuse(key.id, Forbidden(f"the API key {key.id!r} has no {scope!r} scope"))
        return key

    def identify(self, authorization: str | None, scope: Scope) -> str:
        """The caller's key id if it may use `scope`, without taking its quota (gRPC checks this before
        it reads a call's message). Raises 401 or 403."""
        with self._lock:
            self._refresh()
            key = self._caller(bearer(authorization), scope)
        return ANONYMOUS if key is None else key.id

    def _hold(self, key: ApiKey) -> None:
        """One more request under way for `key`, or 429. In flight first: a request refused for it must
        not spend a rate token too. Call under the lock."""
        quota, under_way = self._quotas[key.id], self.in_flight(key.id)
        if quota.max_in_flight is not None and under_way >= quota.max_in_flight:
            raise self._refuse(
                key.id,
                TooManyInFlight(
                    f"the API key {key.id!r} has {under_way} requests under way, its limit",
                    headers={"Retry-After": "1"},
                ),
            )
        wait = quota.take()
        if wait is not None:
            raise self._refuse(
                key.id,
                RateLimited(
                    f"the API key {key.id!r} is over its rate of {quota.rate:g} requests/s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                ),
            )
        self._in_flight[key.id] = under_way + 1

    def _release(self, key_id: str) -> None:
        with self._lock:
            left = self._in_flight[key_id] - 1
            if left:
                self._in_flight[key_id] = left
            else:
                del self._in_flight[key_id]

    @contextmanager
    def admit(self, authorization: str | None, scope: Scope | None) -> Iterator[str]:
        """Hold the request against its key's quota while it runs; yields the key's id (`anonymous`
        for an open route or open classification). Raises 401, 403 or 429."""
        if scope is None:
            yield ANONYMOUS
            return
        with self._lock:
            self._refresh()
            key = self._caller(bearer(authorization), scope)
            if key is not None:
                self._hold(key)
            self.metrics.child(self.metrics.key_requests, ANONYMOUS if key is None else key.id, "accepted").inc()
        if key is None:
            yield ANONYMOUS
            return
        try:
            yield key.id
        finally:
            self._release(key.id)


def credential(values: list[str]) -> str | None:
    """The one credential a request carries (HTTP's `Authorization` headers, gRPC's `authorization`
    metadata): none, or exactly one. Two are refused: which one wins would differ between protocols."""
    if len(values) > 1:
        raise Unauthorized(f"{len(values)} authorization values; send one")
    return values[0] if values else None


def _classify_open(keys: list[ApiKey]) -> bool:
    return not any("classify" in k.scopes for k in keys)


def read_keys(text: bytes | str, source: str) -> list[ApiKey]:
    """Keys from JSON: a list of {id, sha256, scopes, rate_per_s, burst, max_in_flight, revoked}."""
    try:
        return KEY_LIST.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "keys"
        raise GatewayError(f"API keys in {source}: {where}: {first['msg']}") from exc


def new_key(key_id: str, scopes: list[str], rate_per_s: float | None, max_in_flight: int | None) -> tuple[str, dict]:
    """A fresh random key and the entry to configure for it (which holds only its hash)."""
    import secrets

    key = f"kds_{secrets.token_urlsafe(32)}"
    entry = ApiKey(id=key_id, sha256=hash_key(key), scopes=scopes, rate_per_s=rate_per_s, max_in_flight=max_in_flight)
    return key, json.loads(entry.model_dump_json(exclude_none=True, exclude_defaults=False))


@dataclass(frozen=True)
class Access:
    """Who may call an endpoint: a key with `scope`, or anyone (None)."""

    scope: Scope | None


def requires(scope: Scope | None) -> Callable[[T], T]:
    """Declares, where an endpoint is defined, the scope a caller's key needs (None: open to anyone, for
    probes, metrics and the pages). An endpoint without a declaration is refused to everyone: a new admin
    route can no longer become a classify route by being left out of a table elsewhere."""

    def declare(endpoint: T) -> T:
        endpoint.kdserve_access = Access(scope)  # type: ignore[attr-defined]
        return endpoint

    return declare


def declared_scope(route: object) -> Access | None:
    """The access a route (or a mounted app, or a gRPC method) declared; None when it declared none."""
    target = getattr(route, "endpoint", None) or getattr(route, "app", None) or route
    return getattr(target, "kdserve_access", None)


UNMATCHED = Access("classify")  # no route: a caller without a key learns nothing, not even a 404
ROUTE_CACHE_SIZE = 4096  # (method, path) pairs whose route is remembered; paths are the caller's choice


class KeyMiddleware:
    """Every HTTP request checked against the key gate before it is handled (plain ASGI, like the
    observer): the route is matched as the router will match it, and its declared scope applies. A
    refusal is answered in the route's error shape and counted like any error."""

    def __init__(self, app, gate: KeyGate, on_error) -> None:
        self.app, self.gate, self.on_error = app, gate, on_error
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
                raise Forbidden(f"route {scope['path'][:64]} declares no scope: refused (see gateway.keys.requires)")
            authorization = credential([v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"])
            admitted = self.gate.admit(authorization, access.scope)
            key_id = admitted.__enter__()
        except GatewayError as exc:
            self.on_error(exc.kind)
            response = error_response(Request(scope), exc.status_code, exc.kind, exc.message, exc.headers)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["key_id"] = key_id  # request.state.key_id: admission's caller
        try:
            await self.app(scope, receive, send)
        finally:
            admitted.__exit__(None, None, None)
