"""The routes a FastAPI app dispatches to, in the router's order, for the pieces that must see a request's
route before (or beside) the router: the key check and the 405's `Allow` header."""

from __future__ import annotations

from collections.abc import Iterator


def served_routes(routes: list) -> Iterator:
    """Every route a router dispatches to, in its order. FastAPI keeps an included router as one entry
    (`original_router`); its routes already carry the router's own prefix, and the gateway includes
    routers with no prefix of their own (an include prefix would change the paths matched here)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is None:
            yield route
            continue
        prefix = getattr(getattr(route, "include_context", None), "prefix", "")
        if prefix:
            raise ValueError(f"a router included with prefix {prefix!r}: declare the prefix on the APIRouter")
        yield from served_routes(included.routes)
