"""The access an endpoint declares where it is defined (`requires`), read by the HTTP middleware and the gRPC
interceptor alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.auth.keys import Scope

T = TypeVar("T")


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
