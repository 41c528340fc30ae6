"""Erasure: what kdserve keeps of given requests (captured images, feedback labels, A/B answers) removed
everywhere it is kept, for a person's request to have their data deleted.

Captured images and answers may be personal data: they are written readable by the gateways' group only
(`gateway.files`), kept for a retention, and erased here on request. A capture segment that holds other
requests' rows too is rewritten whole without the erased ones (a reader sees the old file or the new
one, never half); a segment left empty is removed. Requests are named by the ids the gateway returned
(`request_id`, `X-Request-ID`). Run it where the capture and the answers are reachable (a Job with the
same volumes, or the object store's credentials).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.feedback.answers import AnswerStore
from kdcontract.capture import (
    IMAGES_PREFIX,
    IMAGES_SUFFIX,
    LABELS_PREFIX,
    LABELS_SUFFIX,
    capture_files,
    decode_label_lines,
    decode_rows,
    encode_images,
    encode_labels,
)


class SegmentStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


@dataclass
class Erased:
    images: int = 0
    labels: int = 0
    answers: int = 0
    segments_rewritten: int = 0
    segments_removed: int = 0

    def summary(self) -> str:
        return (
            f"erased {self.images} captured images, {self.labels} label line(s), {self.answers} A/B answer(s); "
            f"{self.segments_rewritten} segment(s) rewritten, {self.segments_removed} removed"
        )


def erase_capture(location: str, store: SegmentStore, request_ids: set[str], erased: Erased) -> None:
    for name, read in capture_files(location):
        base = Path(name).name
        if base.startswith(IMAGES_PREFIX) and base.endswith(IMAGES_SUFFIX):
            class_names, rows = decode_rows(read())
            kept = [row for row in rows if row.request_id not in request_ids]
            gone = len(rows) - len(kept)
            erased.images += gone
        elif base.startswith(LABELS_PREFIX) and base.endswith(LABELS_SUFFIX):
            items = decode_label_lines(read())
            kept = [item for item in items if item.request_id not in request_ids]
            gone = len(items) - len(kept)
            erased.labels += gone
        else:
            continue
        if not gone:
            continue
        if not kept:
            store.delete(name)
            erased.segments_removed += 1
            continue
        is_images = base.startswith(IMAGES_PREFIX)
        store.put(name, encode_images(kept, class_names) if is_images else encode_labels(kept))
        erased.segments_rewritten += 1


def erase_answers(directory: Path, request_ids: set[str], erased: Erased) -> None:
    # ttl, cap and queue do not matter for erasing: nothing is written.
    store = AnswerStore(directory, ttl_s=1.0, max_records=1, queue_size=1)
    for request_id in request_ids:
        erased.answers += store.erase(request_id)
