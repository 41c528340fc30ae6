"""A serialised gRPC ModelInferRequest's repeated fields counted on the wire, before protobuf parses (and
allocates) them."""

from __future__ import annotations

from gateway.v2.tensors import MAX_PARAMETERS, MAX_TENSORS

# ModelInferRequest's repeated fields (Triton's grpc_service.proto): parameters 4, inputs 5, outputs 6,
# raw_input_contents 7, each bounded; fields 1-3 are single. Anything else is unknown to the protocol.
WIRE_LIMITS = {4: MAX_PARAMETERS, 5: MAX_TENSORS, 6: MAX_TENSORS, 7: MAX_TENSORS}


WIRE_NAMES = {4: "parameters", 5: "inputs", 6: "outputs", 7: "raw_input_contents"}


MAX_WIRE_FIELDS = 64  # top-level fields of any kind: the single ones and the bounded repeated ones fit


def wire_refusal(message: bytes) -> str | None:
    """Why a serialised ModelInferRequest carries more than the protocol takes (None: it may be parsed).

    Reads only the top-level field tags and skips each value, and stops at the first field past its bound:
    parsing first built 800k input messages for one 7 MB call (3 GB of gateway memory, `make faults`)."""
    counts: dict[int, int] = {}
    offset, fields = 0, 0
    try:
        while offset < len(message):
            tag, offset = _varint(message, offset)
            number, wire_type = tag >> 3, tag & 7
            fields += 1
            counts[number] = counts.get(number, 0) + 1
            limit = WIRE_LIMITS.get(number, 1)
            if counts[number] > limit or fields > MAX_WIRE_FIELDS:
                what = WIRE_NAMES.get(number, f"field {number}")
                return f"more than {limit} {what}: at most {limit} {what} per request"
            if wire_type == 0:
                _, offset = _varint(message, offset)
            elif wire_type == 2:
                length, offset = _varint(message, offset)
                offset += length
            elif wire_type in (1, 5):
                offset += 8 if wire_type == 1 else 4
            else:
                return "not a ModelInferRequest"
    except IndexError:
        return "not a ModelInferRequest"
    return None if offset == len(message) else "not a ModelInferRequest"


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80 or shift > 63:
            return value, offset
        shift += 7
