"""The Open Inference Protocol (KServe v2) as the gateway speaks it, independent of REST or gRPC: `tensors`,
`models` and `wire`, used by both bindings (`http.v2`, `grpc`). May import `serving` and below.

Every name `/v1/classify` takes is a v2 model (`student`, `teacher`, `ensemble`, `cascade`, `auto`, and
each served model), with one declared input and one output:

- `IMAGE`, BYTES `[-1, 1]` (or `[-1]`): each element one encoded image (PNG, JPEG, ...), decoded and
  prepared by the gateway exactly as for `/v1/classify`. Over REST's JSON, an element is the image's
  base64 text; over the binary tensor extension and gRPC, its raw bytes.
- or `PIXELS`, UINT8 `[-1, size, size, 3]`: images already prepared (what decoding would make). Not in
  the metadata, which lists one input so generic clients (`perf_analyzer`) send one.
- `PROBABILITIES`, FP32 `[-1, classes]`: calibrated class probabilities (fused for the ensemble). The
  classification extension (`classification: k` on the output) returns BYTES `[-1, k]` strings
  `"probability:index:label"`, best first, as Triton does.

Shapes are checked against the limits before anything is allocated: a declared shape must match the
data sent, at most `max_images` images, and every BYTES element's length prefix must fit the buffer.
"""
