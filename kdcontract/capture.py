"""Captured traffic: the format the gateway writes and training reads (the contract between the two).

A capture is a directory (or an object-store prefix) of segment files, each written whole or not at
all by one gateway replica:
- `images-<ms>-<writer>-<seq>.npz`: one row per classified image, as the models saw it (the prepared
  `uint8` image), with the request id it came in, its index in that request, the model and version that
  answered, its top-1 and calibrated probabilities, the time, and optionally the original file's bytes;
- `labels-<ms>-<writer>-<seq>.jsonl`: feedback labels, one JSON object a line:
  `{"request_id", "labels": [one class name per image], "at", "key"}` (`key`: the API key id that sent
  them, which is the key that made the request; absent in segments written before keys were recorded).

NumPy's `.npz` without pickled objects (`allow_pickle=False` reads it): strings as fixed-width unicode,
original bytes concatenated with offsets. Reading skips, and names, every file that is not a whole
segment of this format (truncated, empty, another format), so a crash or a stray file never stops a
training run.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMAT_VERSION = 1
IMAGES_PREFIX, LABELS_PREFIX = "images-", "labels-"
IMAGES_SUFFIX, LABELS_SUFFIX = ".npz", ".jsonl"
UNLABELLED = -1


@dataclass
class CapturedImage:
    """One image of one classified request, as the gateway captured it."""

    request_id: str
    index: int  # the image's position in its request
    image: np.ndarray  # [H, W, C] uint8, as the models saw it
    model: str
    version: int
    top1: int
    probabilities: np.ndarray  # [C]
    at: float
    original: bytes | None = None
    key: str | None = None  # the API key id that made the request (None: written before keys were recorded)


def segment_name(kind: str, at: float, writer: str, seq: int) -> str:
    """Sortable by time; unique per writer (one gateway process)."""
    prefix, suffix = (IMAGES_PREFIX, IMAGES_SUFFIX) if kind == "images" else (LABELS_PREFIX, LABELS_SUFFIX)
    return f"{prefix}{int(at * 1000):013d}-{writer}-{seq:06d}{suffix}"


def encode_images(rows: list[CapturedImage], class_names: list[str]) -> bytes:
    originals = [row.original or b"" for row in rows]
    offsets = np.cumsum([0, *map(len, originals)]).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format_version=np.array(FORMAT_VERSION),
        class_names=np.array(class_names),
        images=np.stack([row.image for row in rows]).astype(np.uint8),
        request_ids=np.array([row.request_id for row in rows]),
        image_index=np.array([row.index for row in rows], dtype=np.int32),
        models=np.array([row.model for row in rows]),
        versions=np.array([row.version for row in rows], dtype=np.int64),
        top1=np.array([row.top1 for row in rows], dtype=np.int32),
        probabilities=np.stack([row.probabilities for row in rows]).astype(np.float16),
        at=np.array([row.at for row in rows], dtype=np.float64),
        has_original=np.array([row.original is not None for row in rows]),
        originals=np.frombuffer(b"".join(originals), dtype=np.uint8),
        original_offsets=offsets,
        keys=np.array([row.key or "" for row in rows]),
    )
    return buffer.getvalue()


def decode_rows(data: bytes) -> tuple[list[str], list[CapturedImage]]:
    """A whole images segment back as its class names and rows (what `encode_images` wrote): for
    rewriting a segment without some rows (erasure)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        a = {key: npz[key] for key in npz.files}
    offsets = a["original_offsets"]
    keys = a.get("keys", np.full(len(a["images"]), ""))  # absent in segments written before keys were recorded
    rows = [
        CapturedImage(
            str(a["request_ids"][i]),
            int(a["image_index"][i]),
            a["images"][i],
            str(a["models"][i]),
            int(a["versions"][i]),
            int(a["top1"][i]),
            a["probabilities"][i],
            float(a["at"][i]),
            a["originals"][offsets[i] : offsets[i + 1]].tobytes() if a["has_original"][i] else None,
            str(keys[i]) or None,
        )
        for i in range(len(a["images"]))
    ]
    return [str(c) for c in a["class_names"]], rows


class LabelItem(NamedTuple):
    """One feedback item as a labels segment keeps it."""

    request_id: str
    labels: list[str]
    at: float
    key: str | None = None  # the API key id that sent it (None: written before keys were recorded)


def encode_labels(items: Iterable[LabelItem | tuple]) -> bytes:
    lines = []
    for item in items:
        rid, labels, at, key = LabelItem(*item)
        lines.append(json.dumps({"request_id": rid, "labels": labels, "at": at} | ({"key": key} if key else {})))
    return ("\n".join(lines) + "\n").encode()


@dataclass
class CapturedSet:
    """Every whole segment of a capture, images with their labels where feedback gave one."""

    images: np.ndarray  # [N, H, W, C] uint8
    request_ids: np.ndarray  # [N]
    labels: np.ndarray  # [N] class index, UNLABELLED where no feedback came
    top1: np.ndarray  # [N] what the serving model answered
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    label_keys: np.ndarray | None = None  # [N] the API key id each label came from ("" unlabelled or unknown)

    @property
    def labelled(self) -> int:
        return int((self.labels != UNLABELLED).sum())


# A segment's bytes, or a function that reads them: given functions, the reader holds one segment at a time.
SegmentData = bytes | Callable[[], bytes]
READ_ERRORS = (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError)


def read_capture(files: Iterable[tuple[str, SegmentData]]) -> CapturedSet:
    """A capture from its segment files as (name, bytes or a function reading them), in any order; files
    that are not whole segments, or hold images of another size than the capture's first, are skipped and
    listed in `skipped` with the reason (the reader's caller names them).

    Two passes, so memory stays near the result: the first reads each segment's small arrays and checks
    its images' declared shape against the bytes it holds (a header may declare any shape); the second
    reads each accepted segment again and copies its images into one preallocated array. A segment given
    as bytes is held by the caller anyway; given as a function, only one is in memory at a time."""
    parts, label_map, skipped = [], {}, []
    class_names: list[str] | None = None
    image_shape: tuple[int, ...] | None = None
    for name, data in sorted(files, key=lambda item: item[0]):
        try:
            if name.endswith(IMAGES_SUFFIX) and Path(name).name.startswith(IMAGES_PREFIX):
                part = _segment_index(_bytes_of(data))
                if class_names is not None and part["class_names"] != class_names:
                    raise ValueError(f"classes {part['class_names']} differ from the capture's {class_names}")
                if image_shape is not None and part["shape"][1:] != image_shape:
                    raise ValueError(f"images of {_size(part['shape'][1:])}, the capture's are {_size(image_shape)}")
                class_names, image_shape = part["class_names"], part["shape"][1:]
                parts.append((name, data, part))
            elif name.endswith(LABELS_SUFFIX) and Path(name).name.startswith(LABELS_PREFIX):
                label_map.update({item.request_id: item for item in _decode_labels(_bytes_of(data))})
            else:
                raise ValueError("not a capture segment (images-*.npz or labels-*.jsonl)")
        except READ_ERRORS as exc:
            skipped.append((name, str(exc) or type(exc).__name__))
    if not parts:
        return CapturedSet(
            np.zeros((0, 0, 0, 0), np.uint8),
            np.array([]),
            np.array([], np.int64),
            np.array([], np.int64),
            class_names or [],
            skipped,
        )
    images = np.empty((sum(part["shape"][0] for _, _, part in parts), *image_shape), np.uint8)
    kept, at = [], 0
    for name, data, part in parts:
        rows = part["shape"][0]
        try:
            with np.load(io.BytesIO(_bytes_of(data)), allow_pickle=False) as npz:
                images[at : at + rows] = npz["images"]
        except (*READ_ERRORS, MemoryError) as exc:  # changed since the first pass
            skipped.append((name, str(exc) or type(exc).__name__))
            continue
        kept.append(part)
        at += rows
    images = images[:at]
    index = {name: i for i, name in enumerate(class_names)}
    request_ids = np.concatenate([p["request_ids"] for p in kept])
    positions = np.concatenate([p["image_index"] for p in kept])
    labels = np.full(len(images), UNLABELLED, dtype=np.int64)
    keys = [""] * len(images)
    for i, (rid, position) in enumerate(zip(request_ids, positions, strict=True)):
        given = label_map.get(str(rid))
        if given is not None and position < len(given.labels) and given.labels[position] in index:
            labels[i], keys[i] = index[given.labels[position]], given.key or ""
    top1 = np.concatenate([p["top1"] for p in kept]).astype(np.int64)
    return CapturedSet(images, request_ids, labels, top1, class_names, skipped, np.array(keys))


def _bytes_of(data: SegmentData) -> bytes:
    return data() if callable(data) else data


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape[:2]))


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _declared_shape(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """An .npy member's shape and dtype from its header, checked against the bytes the member holds:
    allocating what a header declares would let one file ask for terabytes."""
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f"{member} is in .npy format {version}, this reader reads 1.0 and 2.0")
        shape, fortran, dtype = NPY_HEADER_READERS[version](handle)
        header_bytes = handle.tell()
    if fortran:
        raise ValueError(f"{member} is stored in Fortran order")
    expected = math.prod(shape) * dtype.itemsize
    held = archive.getinfo(member).file_size - header_bytes
    if held != expected:
        raise ValueError(f"{member} declares shape {list(shape)} ({expected} bytes) but holds {held} bytes")
    return tuple(shape), dtype


def _segment_index(data: bytes) -> dict:
    """An images segment's small arrays and its images' shape, without reading the images."""
    if not data:
        raise ValueError("empty file")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        shape, dtype = _declared_shape(archive, "images.npy")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if int(npz["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"format version {int(npz['format_version'])}, this reader reads {FORMAT_VERSION}")
        part = {key: npz[key] for key in ("request_ids", "image_index", "top1")}
        part["class_names"] = [str(c) for c in npz["class_names"]]
    n = shape[0] if shape else -1
    if dtype != np.uint8 or len(shape) != 4 or any(len(part[k]) != n for k in ("request_ids", "image_index", "top1")):
        raise ValueError("inconsistent arrays")
    part["shape"] = shape
    return part


def decode_label_lines(data: bytes) -> list[LabelItem]:
    """A labels segment's items, in order, as `encode_labels` takes them."""
    items = []
    for line in data.decode().splitlines():
        if line.strip():
            item = json.loads(line)
            key = item.get("key")
            items.append(
                LabelItem(
                    str(item["request_id"]),
                    [str(label) for label in item["labels"]],
                    float(item["at"]),
                    None if key is None else str(key),
                )
            )
    return items


def _decode_labels(data: bytes) -> list[LabelItem]:
    if not data:
        raise ValueError("empty file")
    return decode_label_lines(data)


def directory_files(directory: Path) -> list[tuple[str, Callable[[], bytes]]]:
    """A local capture's files (hidden ones, being written, left out), each read when the reader needs it."""
    return [
        (p.name, functools.partial(p.read_bytes))
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]


# -- where a capture lives: a directory, or a prefix in S3-compatible object storage ----------------------
OBJECT_STORE_SCHEME = "s3://"


def is_object_store(location: str) -> bool:
    return location.startswith(OBJECT_STORE_SCHEME)


def bucket_and_prefix(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix ends in "/" unless empty."""
    bucket, _, prefix = url.removeprefix(OBJECT_STORE_SCHEME).partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket (s3://bucket/prefix)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def object_store_client():
    """boto3's S3 client. The endpoint of an S3-compatible store (MinIO, Ceph, moto) comes from
    `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), credentials from the usual AWS variables or role:
    boto3 reads them itself, so nothing here holds a secret."""
    import boto3

    return boto3.client("s3")


def object_store_listing(client, url: str) -> list[tuple[str, int, float]]:
    """(name below the prefix, size, last-modified unix time) of every object under `url`, oldest first."""
    bucket, prefix = bucket_and_prefix(url)
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) :]
            if name and "/" not in name:  # the prefix's own objects, not a deeper "folder"'s
                found.append((name, int(item["Size"]), item["LastModified"].timestamp()))
    return sorted(found, key=lambda item: (item[2], item[0]))


def capture_listing(location: str) -> list[tuple[str, int]]:
    """Names and sizes of a capture's files (a directory or `s3://bucket/prefix`), sorted by name."""
    if is_object_store(location):
        return sorted((name, size) for name, size, _ in object_store_listing(object_store_client(), location))
    root = Path(location).expanduser()
    if not root.is_dir():
        return []
    return sorted((p.name, p.stat().st_size) for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


def capture_digest(location: str) -> str:
    """What a capture held (its segment files' names and sizes): a stage distilled from it is reused only
    while the capture is the same."""
    return hashlib.sha256(json.dumps(capture_listing(location)).encode()).hexdigest()[:16]


def capture_files(location: str) -> list[tuple[str, Callable[[], bytes]]]:
    """A capture's files as (name, a function reading its bytes), from a directory or `s3://bucket/prefix`:
    read one at a time by `read_capture` (an object is fetched once per pass)."""
    if not is_object_store(location):
        return directory_files(Path(location).expanduser())
    client = object_store_client()
    bucket, prefix = bucket_and_prefix(location)

    def fetch(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    return [(name, functools.partial(fetch, prefix + name)) for name, _, _ in object_store_listing(client, location)]
