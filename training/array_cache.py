"""Arrays that take long to compute and never change for the same inputs, kept on disk between runs.

The digits' client-form pictures (ten thousand renderings through PIL, JPEG round trips included)
took 10 s of every training process on a 2-core EPYC, three times that on a slower CPU of the kind,
and every command that trains loads them again. They depend only on the digits, the forms' settings
and the code and library versions that render them, so the key is a hash of exactly those: a change to
any of them computes afresh, and a corrupt or foreign file is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict


class CacheSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDSERVE_", extra="ignore")

    # Empty: $XDG_CACHE_HOME/kdserve, else ~/.cache/kdserve. "off" computes every time.
    cache_dir: str = ""


def cache_dir() -> Path | None:
    configured = CacheSettings().cache_dir
    if configured == "off":
        return None
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdserve"


def cache_key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two splits collide
    return digest.hexdigest()[:32]


def cached_array(kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()`'s array, read from `<cache dir>/<kind>/<key>.npy` when an earlier run wrote it."""
    root = cache_dir()
    if root is None:
        return compute()
    path = root / kind / f"{key}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # truncated or not an .npy: recompute and replace it
        print(f"[cache] {path} unreadable ({exc}); computing it again", file=sys.stderr, flush=True)
    array = compute()
    written: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed into place: a reader sees the whole file or none.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            written = tmp.name
            np.save(tmp, array, allow_pickle=False)
        os.replace(written, path)
    except OSError as exc:  # a read-only home, a full disk: the run goes on without the cache
        print(f"[cache] could not keep {path} ({exc})", file=sys.stderr, flush=True)
        if written is not None:
            Path(written).unlink(missing_ok=True)
    return array
