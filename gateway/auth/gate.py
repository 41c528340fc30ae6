"""The key gate: which configured key a credential is, whether it has the scope an endpoint declares, its rate
and its requests in flight; the keys file followed as it changes, never to a set start-up would refuse."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.auth.keys import (
    ADMIN_TOKEN_ID,
    ANONYMOUS,
    INVALID,
    ApiKey,
    Forbidden,
    RateLimited,
    Scope,
    TooManyInFlight,
    Unauthorized,
    bearer,
    hash_key,
    read_keys,
)
from gateway.auth.rate import TokenBucket
from gateway.errors import GatewayError
from gateway.files import file_stamp
from gateway.telemetry.metrics import GatewayMetrics

log = logging.getLogger("kdserve.gateway")


FILE_CHECK_S = 1.0  # how often the keys file's modification time is looked at, at most


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Quota:
    """One key's rate (a token bucket shared by every request with the key), its request bytes (another, a
    burst of `byte_burst`: one request of the largest body) and its bound in flight."""

    def __init__(self, key: ApiKey, defaults: KeyDefaults):
        self.rate, self.max_in_flight = key.rate_per_s, key.max_in_flight or defaults.max_in_flight
        self.capacity = float(key.burst or max(1, math.ceil(key.rate_per_s or 1)))
        self.bucket = TokenBucket(key.rate_per_s, self.capacity) if key.rate_per_s is not None else None
        self.bytes_per_s = key.bytes_per_s or defaults.bytes_per_s
        self.byte_burst = float(defaults.byte_burst)
        self.bytes = TokenBucket(self.bytes_per_s, self.byte_burst) if self.bytes_per_s is not None else None

    def take(self) -> float | None:
        """None when the request may go; else the seconds until a token is there."""
        return None if self.bucket is None else self.bucket.take()

    def bytes_owed_s(self) -> float:
        """Seconds until the bytes this key sent are paid for (0: none owed)."""
        return 0.0 if self.bytes is None else self.bytes.wait(0)

    def keep_levels(self, before: _Quota) -> None:
        """An unchanged bucket keeps its level across a reload of the keys."""
        if (before.rate, before.capacity) == (self.rate, self.capacity):
            self.bucket = before.bucket
        if (before.bytes_per_s, before.byte_burst) == (self.bytes_per_s, self.byte_burst):
            self.bytes = before.bytes


@dataclass(frozen=True)
class KeyDefaults:
    """What applies to a key that sets no quota of its own (none: unlimited), and the byte budget's burst."""

    max_in_flight: int | None = None
    bytes_per_s: float | None = None
    byte_burst: int = 8 * 1024 * 1024


class KeyGate:
    def __init__(
        self,
        keys: list[ApiKey],
        keys_file: Path | None,
        admin_token_sha256: str | None,
        allow_anonymous: bool,
        metrics: GatewayMetrics,
        host: str = "127.0.0.1",
        defaults: KeyDefaults = KeyDefaults(),
    ):
        """Raises GatewayError for keys that start-up must refuse (see `_check_open`)."""
        self._configured, self.keys_file, self.metrics = list(keys), keys_file, metrics
        if admin_token_sha256 is not None:
            self._configured.append(ApiKey(id=ADMIN_TOKEN_ID, sha256=admin_token_sha256, scopes=["admin"]))
        self.allow_anonymous, self.host = allow_anonymous, host
        self.defaults = defaults
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
            quota, before = _Quota(key, self.defaults), old.get(key.id)
            if before is not None:
                quota.keep_levels(before)
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
                TooManyInFlight(f"the API key {key.id!r} has {under_way} requests under way, its limit", key.id, 1),
            )
        owed = quota.bytes_owed_s()
        if owed > 0:
            raise self._refuse(key.id, self._over_bytes(key.id, quota, owed))
        wait = quota.take()
        if wait is not None:
            raise self._refuse(
                key.id,
                RateLimited(
                    f"the API key {key.id!r} is over its rate of {quota.rate:g} requests/s",
                    key.id,
                    wait,
                ),
            )
        self._in_flight[key.id] = under_way + 1

    @staticmethod
    def _over_bytes(key_id: str, quota: _Quota, owed_s: float) -> RateLimited:
        return RateLimited(
            f"the API key {key_id!r} is over its {quota.bytes_per_s:g} request bytes/s",
            key_id,
            owed_s,
        )

    def spend_bytes(self, key_id: str, count: int) -> None:
        """Count `count` bytes a request of `key_id` sent (or declared it will send) against its byte budget:
        past the budget, its next requests are refused until they are paid for."""
        with self._lock:
            quota = self._quotas.get(key_id)
            if quota is not None and quota.bytes is not None:
                quota.bytes.spend(min(count, quota.byte_burst))

    def bytes_owed_s(self, key_id: str) -> float:
        """Seconds until the bytes `key_id`'s requests sent are paid for (0: none owed, or no budget)."""
        with self._lock:
            quota = self._quotas.get(key_id)
            return 0.0 if quota is None else quota.bytes_owed_s()

    def bytes_refusal(self, key_id: str) -> RateLimited | None:
        """The refusal for `key_id`'s next request while the bytes it sent are not paid for (None: paid)."""
        with self._lock:
            quota = self._quotas.get(key_id)
            owed = 0.0 if quota is None else quota.bytes_owed_s()
            return None if quota is None or owed <= 0 else self._over_bytes(key_id, quota, owed)

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


def _classify_open(keys: list[ApiKey]) -> bool:
    return not any("classify" in k.scopes for k in keys)
