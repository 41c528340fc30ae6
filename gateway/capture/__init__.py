"""Served traffic kept as distillation data, off the request path: `recorder` samples images into
segments, `sinks` keeps them in a directory or S3-compatible storage. May import `telemetry` and the
plain helpers."""
