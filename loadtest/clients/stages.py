"""Load stages, "seconds:users,seconds:users,...": parsed once for the runner and the Locust shape."""

from __future__ import annotations

from kdcontract.errors import UserError


def parse_stages(text: str | None) -> list[tuple[int, int]]:
    """ "20:1,20:2" -> [(20, 1), (20, 2)]; empty or None -> []."""
    stages = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        seconds, _, users = part.partition(":")
        if not (seconds.strip().isascii() and seconds.strip().isdigit() and users.strip().isdigit()):
            raise UserError(f"load stage {part!r}: expected seconds:users, e.g. 20:4")
        stages.append((int(seconds), int(users)))
    if any(seconds == 0 or users == 0 for seconds, users in stages):
        raise UserError(f"load stages {text!r}: every stage needs seconds and users above 0")
    return stages
