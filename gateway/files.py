"""Files other processes read while they are written: each appears whole, or not at all.

Several gateway replicas and the rollout controller share the experiment file and the answer store
(a shared volume); a reader must never see half a file, and a claim must be made by exactly one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Owner read-write, group read: replicas and the controller share a group (fsGroup in Kubernetes); what
# people sent (answers, labels, captured images) is nobody else's to read on a shared volume.
FILE_MODE = 0o640


def _aside(path: Path, content: str | bytes, durable: bool) -> str:
    """`content` in a temporary file beside `path` (same file system, so it can be renamed or linked there)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of a followed file, or None when it does not exist: a change is a new stamp.
    The inode too: files here are replaced whole (a rename, a Secret's symlink swap), and two same-size
    writes within one clock tick share their modification time."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def write_whole(path: Path, content: str | bytes, durable: bool = False) -> None:
    """Replace `path` with `content` at once (rename); `durable`: on disk before it is renamed into place."""
    tmp = _aside(path, content, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_once(path: Path, text: str) -> bool:
    """Create `path` holding `text`, unless it exists: True for the one caller, on any replica, that
    created it. Hard-linked into place (a link, like O_EXCL, fails when the name exists), so the file
    never appears empty to a reader."""
    tmp = _aside(path, text, durable=False)
    try:
        os.link(tmp, path)
    except FileExistsError:
        # Over NFS a retransmitted LINK can answer "exists" to the caller whose first LINK made it: then
        # the temporary file has two names, and this caller won.
        return os.stat(tmp).st_nlink == 2
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True
